"""The int8 product of ``w8a8`` against ``F.linear``, at the shapes of the reference model's layers.

Each row of the output is one (rows, in -> out) product: float32 ``F.linear``, then the int8 layer
(inputs quantized per token, ``torch._int_mm``, rescaled), interleaved and timed as medians; and the
int8 layer's largest error over the float one's largest output (quant/linear.py; docs/memory.md).
Usage: python scripts/int8_kernel.py [REPEATS]
"""

import statistics
import sys
import time

import torch
import torch.nn as nn

from actvar_cli.quant.linear import QuantLinear

repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 50
LAYERS = {"mat_qkv": (256, 768), "proj": (256, 256), "fc1": (256, 1024), "fc2": (1024, 256), "head": (256, 1024)}


def median_ms(fn, x) -> float:
    for _ in range(5):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


torch.manual_seed(0)
print(f"{'layer':8} {'rows':>5} {'float ms':>9} {'int8 ms':>8} {'speedup':>8} {'error':>7}")
with torch.inference_mode():
    for rows in (16, 64, 256, 1024):  # 2 x batch 8 x tokens: scales 1, 2, 4 and the last of tiny
        for name, (n_in, n_out) in LAYERS.items():
            lin = nn.Linear(n_in, n_out)
            q = QuantLinear.from_linear(lin, "int8", activations="int8")
            x = torch.randn(rows, n_in)
            t_float, t_int8 = median_ms(lin, x), median_ms(q, x)
            ref = lin(x)
            err = ((q(x) - ref).abs().max() / ref.abs().max()).item()
            print(f"{name:8} {rows:5d} {t_float:9.3f} {t_int8:8.3f} {t_float / t_int8:7.2f}x {err:7.4f}")
