"""docs/memory.md's tables: what generation of d16-d36 needs (bf16 autocast on a GPU, fused
attention), and the largest batch that fits in 90% of each GPU, from ``actvar memory``'s plan.
Usage: python scripts/memory_table.py   (a few seconds; nothing is loaded)
"""

from actvar_cli.commands.memory import MemoryRequest, run

ARCHS = ["d16", "d20", "d24", "d30", "d36"]
METHODS = {"dense": None, "ActVAR": "actvar", "int8": "int8", "KV int8": "kv-int8", "all three": "actvar+int8+kv-int8"}
BATCHES = [1, 16, 64, 256]
GPUS = [24, 48, 80, 141]
HEADROOM = 0.9  # of a GPU's memory: the CUDA context, the allocator's fragmentation, other processes


def total_gb(arch: str, method: str | None, batch: int) -> float:
    return run(MemoryRequest(arch=arch, batch_size=batch, method=method, dtype="bf16")).plan.to_dict()["total_gb"]


def largest_batch(arch: str, method: str | None, gb: float) -> int:
    lo, hi = 0, 1 << 14  # lo fits (or is 0), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total_gb(arch, method, mid) <= HEADROOM * gb else (lo, mid)
    return lo


print("| model | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
print("|---|" + "---|" * len(BATCHES))
for arch in ARCHS:
    for name, method in METHODS.items():
        cells = " | ".join(f"{total_gb(arch, method, b):.1f}" for b in BATCHES)
        print(f"| {arch} {name} | {cells} |")
print()
print("| model | " + " | ".join(f"{g} GB" for g in GPUS) + " |")
print("|---|" + "---|" * len(GPUS))
for arch in ARCHS:
    for name, method in METHODS.items():
        cells = " | ".join(str(largest_batch(arch, method, g) or "-") for g in GPUS)
        print(f"| {arch} {name} | {cells} |")
