"""One scale's step alone, dense against ActVAR: timed, then self time per operation under the profiler.

The step's inputs (tokens, KV cache) are captured from a generation, and the step is run again on
them, so that only its own operations are measured (docs/benchmarks.md, "Where a sparse step loses").
Usage: python scripts/profile_step.py [ARCH] [BATCH] [SCALE (1-based)]
"""

import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from actvar_cli.commands.bench import random_pair
from actvar_cli.generation.sampling import SamplingOptions, generate, image_generators
from actvar_cli.models.kv_cache import LayerCache
from actvar_cli.runtime import CPU
from actvar_cli.sparsity.blocks import GenerationState

arch = sys.argv[1] if len(sys.argv) > 1 else "tiny"
batch, scale = (int(a) for a in (sys.argv[2:4] if len(sys.argv) > 3 else (8, 7)))
pair = random_pair(arch, None, CPU)
dense, sparse, vae = pair.dense, pair.sparse, pair.vae
labels = torch.arange(batch) % dense.num_classes
si = scale - 1


def capture(model, policy) -> dict:
    """The arguments the step at scale ``si`` received during one generation."""
    got, step = {}, model.generation_step

    def spy(x, cond, s, cache, **kw):
        if s == si:
            got.update(x=x.clone(), cond=cond.clone(), kv=[(c.k, c.v) for c in cache])
        return step(x, cond, s, cache, **kw)

    model.generation_step = spy
    generate(model, vae, labels, SamplingOptions(), rng=image_generators(0, range(batch), "cpu"), policy=policy)
    del model.generation_step
    return got


def run_step(model, policy, got) -> None:
    cache = [LayerCache() for _ in got["kv"]]
    for c, (k, v) in zip(cache, got["kv"]):
        c.k, c.v = k, v  # append makes new tensors: the captured ones stay as they were
    model.generation_step(got["x"], got["cond"], si, cache, policy=policy, state=GenerationState())


models = {"dense": (dense, None), "ActVAR": (sparse, sparse.policy)}
with torch.inference_mode():
    inputs = {n: capture(m, p) for n, (m, p) in models.items()}
    seconds = {n: [] for n in models}
    for r in range(25):
        for n, (m, p) in models.items():
            t0 = time.perf_counter()
            run_step(m, p, inputs[n])
            if r >= 5:
                seconds[n].append(time.perf_counter() - t0)
    ratio = statistics.median(d / s for d, s in zip(seconds["dense"], seconds["ActVAR"]))
    ms = {n: statistics.median(t) * 1e3 for n, t in seconds.items()}
    print(
        f"{arch}, batch {batch}, scale {scale}: dense {ms['dense']:.2f} ms, ActVAR {ms['ActVAR']:.2f} ms, {ratio:.2f}x"
    )
    self_ms = {}
    for n, (m, p) in models.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                run_step(m, p, inputs[n])
        self_ms[n] = {e.key: (e.self_cpu_time_total / 1e4, e.count // 10) for e in prof.key_averages()}
ops = sorted(
    set(self_ms["dense"]) | set(self_ms["ActVAR"]), key=lambda k: -max(v.get(k, (0, 0))[0] for v in self_ms.values())
)
print(f"{'operation':36s} {'dense ms':>9s} {'calls':>6s} {'ActVAR ms':>9s} {'calls':>6s}")
for op in ops:
    (d, dn), (s, sn) = self_ms["dense"].get(op, (0, 0)), self_ms["ActVAR"].get(op, (0, 0))
    if max(d, s) > 0.05:
        print(f"{op[:36]:36s} {d:9.2f} {dn:6d} {s:9.2f} {sn:6d}")
