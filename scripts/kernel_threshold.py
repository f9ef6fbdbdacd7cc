"""Where the masked expert kernel beats the per-expert loop, timed inside whole generations.

Each sparse scale's step is timed in interleaved dense/ActVAR runs (`bench --by-scale`) with the
masked kernel's threshold set so that a scale takes one kernel or the other; docs/benchmarks.md,
"The expert kernel on a CPU". Usage: python scripts/kernel_threshold.py [ARCH] [BATCH] [REPEATS]
"""

import sys

from actvar_cli.commands.bench import random_pair
from actvar_cli.measure.timing import bench
from actvar_cli.runtime import CPU
from actvar_cli.sparsity import experts
from actvar_cli.sparsity.flops import count_flops

arch = sys.argv[1] if len(sys.argv) > 1 else "tiny"
batch, repeats = (int(a) for a in (sys.argv[2:4] if len(sys.argv) > 3 else (8, 9)))
pair = random_pair(arch, None, CPU)
dense, sparse, vae = pair.dense, pair.sparse, pair.vae
C, d_e = dense.cfg.embed_dim, dense.cfg.ffn_dim // sparse.cfg.num_experts
flops = count_flops(sparse.cfg, sparse.policy)
for threshold in (1e3, 1e12):  # every scale takes the loop, then every scale takes the masked kernel
    experts.MASKED_BELOW_MACS_PER_EXPERT = threshold
    r = bench(dense, sparse, vae, runtime=CPU, batch_size=batch, repeats=repeats, by_scale=True)
    kernel = "loop" if threshold < 1e6 else "masked"
    for row, sf in zip(r["by_scale"]["scales"], flops.scales):
        if sf.kept_experts < sparse.cfg.num_experts:
            rows = 2 * batch * sf.kept_tokens * sf.kept_experts / sparse.cfg.num_experts  # per expert, CFG rows
            print(
                f"{arch} batch {batch} scale {row['scale']}: {rows * C * d_e / 1e6:.1f} M multiply-adds per expert, "
                f"{kernel}: {row['speedup']:.2f}x (whole generation {r['speedup']:.3f}x)"
            )
