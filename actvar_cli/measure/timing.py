"""``bench``: measured wall-clock speed of dense vs ActVAR generation, beside the FLOPs ideal.

Both models generate the same classes with the same per-image seeds. After warm-up the
runs alternate (dense, sparse, dense, ...) so that drift in machine speed hits both alike;
medians are reported. Transformer time (the whole autoregressive loop) is measured on every
run; the VAE decode, the same work for both models, once per model.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..generation.sampling import SamplingOptions, decode_images, generate, image_generators
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..progress import Progress
from ..runtime import Runtime
from ..sparsity.flops import FlopsReport, count_flops
from ..sparsity.policy import SparsityPolicy
from .profiling import time_components


class PeakMemory:
    """Peak CUDA allocation, or on the CPU the peak resident set size sampled every few ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            import psutil  # installed with accelerate
        except ImportError:  # pragma: no cover
            return self
        proc = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.005)

        self.peak = proc.memory_info().rss
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "process_rss"


@contextlib.contextmanager
def timed_steps(model: VAR, runtime: Runtime) -> Iterator[list[float]]:
    """Seconds of each ``generation_step`` (one per scale) while inside. On CUDA each step then
    ends in a host sync, so only ``--by-scale`` and ``--breakdown`` ask for it."""
    seconds: list[float] = []
    step = model.generation_step

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        logits = step(*args, **kwargs)
        runtime.synchronize()
        seconds.append(time.perf_counter() - t0)
        return logits

    own = vars(model).get("generation_step")  # a compiled step (--compile) is an instance attribute too
    model.generation_step = timed  # an instance attribute shadows the method until removed
    try:
        yield seconds
    finally:
        if own is None:
            del model.generation_step
        else:
            model.generation_step = own


def one_run(
    model: VAR,
    vae: VQVAE,
    labels: torch.Tensor,
    *,
    seed: int,
    policy: SparsityPolicy | None,
    runtime: Runtime,
    decode: bool = True,
) -> tuple[float, float, int]:
    """(generation seconds, decode seconds, peak memory in bytes) of one batch."""
    rng = image_generators(seed, range(labels.shape[0]), runtime.device)
    with PeakMemory(runtime.device) as mem:
        runtime.synchronize()
        t0 = time.perf_counter()
        with runtime.autocast():
            gen = generate(model, vae, labels, SamplingOptions(), rng=rng, policy=policy)
        runtime.synchronize()
        t1 = time.perf_counter()
        if decode:
            decode_images(vae, gen.f_hat)
            runtime.synchronize()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, mem.peak


def share_of_ideal(speedup: float, ideal: float) -> float | None:
    """(speedup - 1) / (ideal - 1): how much of the FLOPs' promised gain the clock shows."""
    return (speedup - 1) / (ideal - 1) if ideal > 1 else None


def paired_speedup(dense_runs: list[float], other_runs: list[float]) -> float:
    """Median of run-by-run time ratios. Runs alternate, so each ratio compares two runs made
    moments apart: a machine that drifts (measured here: 0.37 s to 0.55 s over 21 runs of the
    same batch) moves both sides of a ratio, not one median more than the other."""
    return statistics.median(d / o for d, o in zip(dense_runs, other_runs, strict=True))


UPSTREAM_DEMO_CLASSES = (980, 437, 22, 562, 207, 360, 387, 974)


def bench_classes(num_classes: int) -> tuple[int, ...]:
    """Upstream VAR's demo classes on ImageNet models; every class of any other model."""
    return UPSTREAM_DEMO_CLASSES if num_classes == 1000 else tuple(range(num_classes))


def bench(
    dense: VAR,
    sparse: VAR,
    vae: VQVAE,
    *,
    runtime: Runtime,
    batch_size: int = 8,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    policy: SparsityPolicy | None = None,
    progress: Progress | None = None,
    by_scale: bool = False,
) -> dict[str, Any]:
    """Dense and sparse generation timed side by side, in alternating runs of the same batch."""
    policy = policy or sparse.policy
    classes = bench_classes(dense.num_classes)
    labels = torch.tensor([classes[i % len(classes)] for i in range(batch_size)], device=runtime.device)
    runs: dict[str, list[tuple[float, float, int]]] = {"dense": [], "sparse": []}
    steps: dict[str, list[list[float]]] = {"dense": [], "sparse": []}  # per run, seconds of each scale's step
    total = 2 * (warmup + repeats)
    done = 0
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for name, model, pol in (("dense", dense, None), ("sparse", sparse, policy)):
                # the VQVAE decode is the same work for both models: timed once each
                with timed_steps(model, runtime) if by_scale else contextlib.nullcontext([]) as step_s:
                    # warm-up runs decode too: the first timed run never follows the first decode (allocations)
                    result = one_run(model, vae, labels, seed=seed, policy=pol, runtime=runtime, decode=r <= warmup)
                if r >= warmup:
                    runs[name].append(result)
                    steps[name].append(step_s)
                done += 1
                if progress:
                    progress("benchmark", done, total)

    def summary(name: str) -> dict[str, Any]:
        gen = statistics.median(t for t, _, _ in runs[name])
        dec = runs[name][0][1]
        return {
            "generation_s": gen,
            "decode_s": dec,
            "end_to_end_s": gen + dec,
            "images_per_s": batch_size / gen,
            "images_per_s_end_to_end": batch_size / (gen + dec),
            "peak_memory_mb": max(m for _, _, m in runs[name]) / 2**20,
            "generation_s_all": [round(t, 4) for t, _, _ in runs[name]],
        }

    d, s = summary("dense"), summary("sparse")
    flops = count_flops(sparse.cfg, policy)
    ideal = flops.dense_flops / flops.sparse_flops
    speedup = paired_speedup([t for t, _, _ in runs["dense"]], [t for t, _, _ in runs["sparse"]])
    out = {
        **runtime.describe(),
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "policy": policy.to_dict() if policy is not None else None,
        "dense": d,
        "sparse": s,
        "speedup": speedup,
        "speedup_end_to_end": d["end_to_end_s"] / (d["generation_s"] / speedup + s["decode_s"]),
        "ideal_speedup": ideal,
        "efficiency": share_of_ideal(speedup, ideal),
        "dense_flops": flops.dense_flops,
        "sparse_flops": flops.sparse_flops,
        "savings": flops.savings,
        "memory_kind": PeakMemory(runtime.device).kind,
    }
    if by_scale:
        out["by_scale"] = scale_table(d["generation_s"], steps, flops, ideal)
    return out


def scale_table(
    dense_generation_s: float, steps: dict[str, list[list[float]]], flops: FlopsReport, ideal: float
) -> dict[str, Any]:
    """Each scale's step, dense and sparse (medians over runs), beside its FLOPs ratio; and the
    *bound*: the whole speedup if every step ran at its own FLOPs ratio while the work outside the
    steps (sampling, the VQVAE's residual update) stayed as it is."""
    rows, bound_s = [], 0.0
    for si, sf in enumerate(flops.scales):
        d = statistics.median(run[si] for run in steps["dense"])
        s = statistics.median(run[si] for run in steps["sparse"]) if si < len(steps["sparse"][0]) else 0.0
        fd, fs = sum(sf.dense.values()), sum(sf.sparse.values())
        bound_s += d * fs / fd
        rows.append(
            {
                "scale": si + 1,
                "tokens": sf.tokens,
                "dense_s": d,
                "sparse_s": s,
                "speedup": d / s if s else None,
                "flops_ratio": fd / fs if fs else None,
                "dense_flops_share": fd / flops.dense_flops,
            }
        )
    outside = dense_generation_s - sum(r["dense_s"] for r in rows)
    bound = dense_generation_s / (bound_s + outside)
    return {
        "scales": rows,
        "outside_steps_s": outside,
        "bound_speedup": bound,
        "bound_efficiency": share_of_ideal(bound, ideal),
    }


COMPONENT_FLOPS = {  # which FLOPs counter components each timed component runs
    "attention": ("qkv", "attention", "proj", "deltas"),
    "ffn": ("ffn", "router"),
    "select": ("selector",),
    "head": ("head",),
    "decode": (),
}


def breakdown(dense: VAR, sparse: VAR, vae: VQVAE, *, runtime: Runtime, batch_size: int, seed: int = 0) -> dict:
    """Seconds per component of one generation and decode, dense and sparse, beside each component's
    share of the FLOPs (the decode is not counted in FLOPs)."""
    labels = torch.tensor([i % dense.num_classes for i in range(batch_size)], device=runtime.device)
    out: dict[str, Any] = {}
    flops = count_flops(sparse.cfg.replace(num_experts=0), sparse.policy, sparse.cfg.num_experts)
    for name, model, pol, which in (("dense", dense, None, "dense"), ("sparse", sparse, sparse.policy, "sparse")):

        def once(m=model, p=pol):
            return one_run(m, vae, labels, seed=seed, policy=p, runtime=runtime)

        once()  # warm up
        seconds = time_components(once, runtime)
        comp = flops.by_component(which)
        total_flops = sum(comp.values())
        share = {c: sum(comp[k] for k in keys) / total_flops for c, keys in COMPONENT_FLOPS.items()}
        share["other"] = 1 - sum(share.values())
        out[name] = {"seconds": seconds, "flops_share": share}
    return out
