"""The memory plan against measured peak memory on this CPU (docs/memory.md).

Each point runs in a fresh process: the resident set before the model is loaded is the baseline,
and the peak while one batch is generated and decoded, minus it, is what the model took.
Usage: python scripts/memory_check.py [ARCH:BATCH[:STACK] ...]   (default: tiny and d12 points)
"""

import json
import subprocess
import sys

POINTS = ["tiny:8", "tiny:32", "tiny:32:kv-int8", "d12:1", "d12:8", "d12:8:int8", "d12:8:int8+kv-int8"]
CHILD = r"""
import json, sys, psutil, torch
from actvar_cli.measure.timing import PeakMemory, one_run
arch, batch, stack = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
torch.set_num_threads(2)
proc = psutil.Process()
base = proc.memory_info().rss
from actvar_cli.commands import memory
from actvar_cli.commands.bench import random_pair
from actvar_cli.convert.method_models import MethodBuilder
from actvar_cli.runtime import CPU
pair = random_pair(arch, None, CPU)
m = MethodBuilder(pair.dense, pair.vae, calib_images=0).build(stack) if stack else None
del pair.sparse
model, policy = (m.model, m.policy) if m else (pair.dense, None)
labels = torch.arange(batch) % model.num_classes
with torch.inference_mode(), PeakMemory(torch.device("cpu")) as mem:
    one_run(model, pair.vae, labels, seed=0, policy=policy, runtime=CPU)
plan = memory.run(memory.MemoryRequest(arch=arch, batch_size=batch, method=stack, device="cpu")).to_dict()
print(json.dumps({"arch": arch, "batch": batch, "stack": stack, "measured_gb": (mem.peak - base) / 2**30,
                  "plan_gb": plan["total_gb"], "components": plan["components"]}))
"""

for point in sys.argv[1:] or POINTS:
    arch, batch, *stack = point.split(":")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, arch, batch, stack[0] if stack else ""],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    ratio = r["plan_gb"] / r["measured_gb"]
    print(
        f"{arch} batch {batch} {r['stack'] or 'dense'}: measured {r['measured_gb']:.3f} GB, "
        f"plan {r['plan_gb']:.3f} GB ({ratio:.2f}x)",
        flush=True,
    )
