"""A/A check of the benchmark: a dense model against an exact copy of itself.

Same work, same code path, so every ratio away from 1.00 is the noise floor of `actvar bench` on
this machine (docs/benchmarks.md, "How far to trust one sweep").
Usage: python scripts/bench_aa.py [ARCH] [BATCH] [REPEATS]
"""

import copy
import sys

from actvar_cli.commands.bench import random_pair
from actvar_cli.measure.timing import bench
from actvar_cli.runtime import CPU
from actvar_cli.sparsity.policy import SparsityPolicy

arch = sys.argv[1] if len(sys.argv) > 1 else "d16"
batch, repeats = (int(a) for a in (sys.argv[2:4] if len(sys.argv) > 3 else (1, 5)))
pair = random_pair(arch, None, CPU)
model, vae = pair.dense, pair.vae
twin = copy.deepcopy(model)  # fresh tensors, equal values
r = bench(
    model, twin, vae, runtime=CPU, batch_size=batch, repeats=repeats, by_scale=True, policy=SparsityPolicy.dense()
)
per_scale = " ".join(f"{s['speedup']:.2f}" for s in r["by_scale"]["scales"])
print(f"{arch}, batch {batch}: model against its copy {r['speedup']:.3f}x; per scale {per_scale}")
