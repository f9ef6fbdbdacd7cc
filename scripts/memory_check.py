"""The memory plan against measured peak memory on this CPU (docs/memory.md).

Model files are written first (random d12 weights, its int8 copy, stacks), as a user would have
them. Each point then runs in a fresh process that imports everything, generates two images with
the reference model and frees it (the kernels' code and thread pools are the runtime's, not the
model's), takes its resident set as the baseline, loads the file and generates and decodes one
batch; the peak resident set during that, minus the baseline, is what the model took.
``MALLOC_MMAP_THRESHOLD_`` makes glibc hand large buffers back to the system when they are freed,
so that the resident set follows the live tensors (by default glibc raises its threshold after the
first frees and keeps freed buffers resident).
Usage: python scripts/memory_check.py [WORKDIR]   (about 5 minutes on 2 CPU cores)
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ACTVAR = [sys.executable, "-m", "actvar_cli"]
CHILD = r"""
import gc, json, sys, psutil, torch
from actvar_cli.commands import memory
from actvar_cli.commands.loading import load_models
from actvar_cli.measure.timing import PeakMemory, one_run
from actvar_cli.runtime import CPU
torch.set_num_threads(2)
model_file, vae, batch = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
warm = load_models("tiny")  # pages in the kernels' code and thread pools: the runtime's, not the model's
with torch.inference_mode():
    one_run(warm.model, warm.vae, torch.arange(2), seed=0, policy=None, runtime=CPU)
del warm
gc.collect()
proc = psutil.Process()
base = proc.memory_info().rss
loaded = load_models(model_file, vae=vae)
model = loaded.model
labels = torch.arange(batch) % model.num_classes
with torch.inference_mode(), PeakMemory(torch.device("cpu")) as mem:
    one_run(model, loaded.vae, labels, seed=0, policy=model.policy, runtime=CPU)
plan = memory.run(memory.MemoryRequest(model=model_file, batch_size=batch, device="cpu")).to_dict()
print(json.dumps({"measured_gb": (mem.peak - base) / 2**30, "plan_gb": plan["total_gb"]}))
"""


def make_files(work: Path) -> dict[str, tuple[str, str]]:
    """name -> (model file, VQVAE) for every point."""

    def actvar(*args: str) -> None:
        subprocess.run([*ACTVAR, *args], check=True, capture_output=True)

    files = {"tiny": ("tiny", "")}
    for name, make in {
        "tiny+kv-int8": ("moefy", "tiny", "--method", "kv-int8"),
        "d12": ("random-weights", "d12"),
        "vae": ("random-weights", "vae"),
    }.items():
        target = work / f"{name}.safetensors"
        if not target.exists():
            actvar(*make, "-o", str(target))
    d12, vae = str(work / "d12.safetensors"), str(work / "vae.safetensors")
    for name, make in {
        "d12+int8": ("quantize", d12, "--weights", "int8"),
        "d12+kv-int8": ("moefy", d12, "--method", "kv-int8", "--vae", vae),
        "d12+int8+kv-int8": ("moefy", d12, "--method", "int8+kv-int8", "--vae", vae),
    }.items():
        target = work / f"{name}.safetensors"
        if not target.exists():
            actvar(*make, "-o", str(target))
    files["tiny+kv-int8"] = (str(work / "tiny+kv-int8.safetensors"), "")
    for name in ("d12", "d12+int8", "d12+kv-int8", "d12+int8+kv-int8"):
        files[name] = (str(work / f"{name}.safetensors"), vae)
    return files


POINTS = [("tiny", 8), ("tiny", 32), ("tiny+kv-int8", 32), ("d12", 1), ("d12", 8), ("d12+int8", 8),
          ("d12+kv-int8", 8), ("d12+int8+kv-int8", 8)]  # fmt: skip


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="memory-check-"))
    work.mkdir(parents=True, exist_ok=True)
    files = make_files(work)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for name, batch in POINTS:
        model_file, vae = files[name]
        out = subprocess.run(
            [sys.executable, "-c", CHILD, model_file, vae, str(batch)], capture_output=True, text=True, env=env
        )
        if out.returncode:
            print(f"{name} batch {batch}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{name:18s} batch {batch:3d}: measured {r['measured_gb']:.3f} GB, plan {r['plan_gb']:.3f} GB "
            f"(plan/measured {r['plan_gb'] / r['measured_gb']:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
