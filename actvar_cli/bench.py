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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .device import autocast, synchronize
from .flops import FlopsReport, count_flops
from .model import VAR
from .policy import SparsityPolicy
from .progress import Progress
from .sampling import SamplingOptions, decode_images, generate, image_generators
from .vqvae import VQVAE


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
def timed_steps(model: VAR, device: torch.device) -> Iterator[list[float]]:
    """Seconds of each ``generation_step`` (one per scale) while inside. On CUDA each step then
    ends in a host sync, so only ``--by-scale`` and ``--breakdown`` ask for it."""
    seconds: list[float] = []
    step = model.generation_step

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        logits = step(*args, **kwargs)
        synchronize(device)
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


def _one_run(
    model: VAR,
    vae: VQVAE,
    labels: torch.Tensor,
    seed: int,
    opts: SamplingOptions,
    policy: SparsityPolicy | None,
    device: torch.device,
    dtype: str,
    decode: bool = True,
) -> tuple[float, float, int]:
    rng = image_generators(seed, range(labels.shape[0]), device)
    with PeakMemory(device) as mem:
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            gen = generate(model, vae, labels, opts, rng=rng, policy=policy)
        synchronize(device)
        t1 = time.perf_counter()
        if decode:
            decode_images(vae, gen.f_hat)
            synchronize(device)
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
    device: torch.device,
    dtype: str = "fp32",
    batch_size: int = 8,
    repeats: int = 5,
    warmup: int = 1,
    classes: tuple[int, ...] | None = None,
    seed: int = 0,
    policy: SparsityPolicy | None = None,
    progress: Progress | None = None,
    by_scale: bool = False,
) -> dict[str, Any]:
    policy = policy or sparse.policy
    classes = classes or bench_classes(dense.num_classes)
    labels = torch.tensor([classes[i % len(classes)] for i in range(batch_size)], device=device)
    opts = SamplingOptions()
    runs: dict[str, list[tuple[float, float, int]]] = {"dense": [], "sparse": []}
    steps: dict[str, list[list[float]]] = {"dense": [], "sparse": []}  # per run, seconds of each scale's step
    total = 2 * (warmup + repeats)
    done = 0
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for name, model, pol in (("dense", dense, None), ("sparse", sparse, policy)):
                # the VQVAE decode is the same work for both models: timed once each
                with timed_steps(model, device) if by_scale else contextlib.nullcontext([]) as step_s:
                    result = _one_run(model, vae, labels, seed, opts, pol, device, dtype, decode=r == warmup)
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
        "device": str(device),
        "dtype": dtype,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "policy": policy.to_dict(),
        "dense": d,
        "sparse": s,
        "speedup": speedup,
        "speedup_end_to_end": d["end_to_end_s"] / (d["generation_s"] / speedup + s["decode_s"]),
        "ideal_speedup": ideal,
        "efficiency": share_of_ideal(speedup, ideal),
        "dense_flops": flops.dense_flops,
        "sparse_flops": flops.sparse_flops,
        "savings": flops.savings,
        "memory_kind": PeakMemory(device).kind,
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


def load_pair(dense: str | None, sparse: str | None, arch: str | None, vae: str | None) -> tuple[VAR, VAR, VQVAE, str]:
    """The two models to compare and a VAE, from files or (``arch``) with random weights.

    Timing does not depend on the weights, so ``--arch`` converts a random model in memory
    (router and selector from weight statistics: no calibration needed to time it), and a
    missing VAE is replaced by one of the right shape with random weights.
    """
    from .checkpoint import load_vae, load_var
    from .config import BUILTIN_NAME, VAEConfig, arch_config
    from .conversion import MoefyOptions, moefy
    from .errors import ConfigError
    from .method_specs import last
    from .random_weights import random_state_dict

    notes = []
    if arch is not None:
        if dense or sparse:
            raise ConfigError("give --arch or two checkpoints, not both")
        cfg = arch_config(arch)
        sd = random_state_dict(VAR(cfg), 0)
        dense_model = _from_sd(cfg, sd)
        policy = SparsityPolicy(scales=last(len(cfg.patch_nums), 2))  # the paper's default: the last two scales
        sparse_model, _ = moefy(_from_sd(cfg, sd), None, MoefyOptions(calib_images=0, policy=policy))
        notes.append(f"random {arch} weights, converted in memory with the default policy")
    else:
        if not (dense and sparse):
            raise ConfigError("give the dense and the ActVAR checkpoint (or --arch)")
        dense_model, _ = load_var(dense)
        sparse_model, info = load_var(sparse)
        if info.kind != "actvar":
            raise ConfigError(f"{sparse} is not an ActVAR model", "convert it first with `actvar moefy`")
        if sparse_model.cfg.replace(num_experts=0) != dense_model.cfg:
            raise ConfigError("the two models have different architectures")
    if vae is not None:
        vae_model, _ = load_vae(vae, dense_model.cfg.patch_nums)
    elif dense_model.cfg == arch_config(BUILTIN_NAME):
        vae_model, _ = load_vae(BUILTIN_NAME, dense_model.cfg.patch_nums)
    else:
        vae_cfg = VAEConfig(patch_nums=dense_model.cfg.patch_nums)
        with torch.device("meta"):
            vae_model = VQVAE(vae_cfg)
        vae_model.load_state_dict(random_state_dict(VQVAE(vae_cfg), 1), assign=True)
        vae_model.eval().requires_grad_(False)
        notes.append(f"decode timed with a random-weight VQVAE (ch={vae_cfg.ch})")
    return dense_model, sparse_model, vae_model, "; ".join(notes)


def _from_sd(cfg, sd) -> VAR:
    with torch.device("meta"):
        model = VAR(cfg)
    model.load_state_dict(sd, strict=True, assign=True)  # the models may share tensors: inference never writes them
    return model.eval().requires_grad_(False)


SWEEP_ARCHS = ("tiny", "d12", "d16", "d20")
SWEEP_BATCHES = (1, 4, 8)
COMPONENT_FLOPS = {  # which FLOPs counter components each timed component runs
    "attention": ("qkv", "attention", "proj"),
    "ffn": ("ffn", "router"),
    "select": ("selector",),
    "head": ("head",),
    "decode": (),
}


def breakdown(dense: VAR, sparse: VAR, vae: VQVAE, device, dtype: str, batch_size: int, seed: int = 0) -> dict:
    """Seconds per component of one generation and decode, dense and sparse, beside each component's
    share of the FLOPs (the decode is not counted in FLOPs)."""
    from .profiling import time_components

    labels = torch.tensor([i % dense.num_classes for i in range(batch_size)], device=device)
    out: dict[str, Any] = {}
    flops = count_flops(sparse.cfg.replace(num_experts=0), sparse.policy, sparse.cfg.num_experts)
    for name, model, pol, which in (("dense", dense, None, "dense"), ("sparse", sparse, sparse.policy, "sparse")):
        _one_run(model, vae, labels, seed, SamplingOptions(), pol, device, dtype)  # warm up
        seconds = time_components(
            lambda m=model, p=pol: _one_run(m, vae, labels, seed, SamplingOptions(), p, device, dtype), device
        )
        comp = flops.by_component(which)
        total_flops = sum(comp.values())
        share = {c: sum(comp[k] for k in keys) / total_flops for c, keys in COMPONENT_FLOPS.items()}
        share["other"] = 1 - sum(share.values())
        out[name] = {"seconds": seconds, "flops_share": share}
    return out


@dataclass
class BenchRequest:
    """What ``actvar bench`` was asked for (several architectures and batch sizes make a sweep)."""

    dense: str | None = None
    sparse: str | None = None
    archs: list[str] | None = None
    vae: str | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [8])
    repeats: int = 5
    warmup: int = 1
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    compile: bool = False
    breakdown: bool = False  # time per component (under the profiler) and per scale
    by_scale: bool = False  # time per scale only: no profiled run
    plot: Path | None = None  # a PNG of the per-scale times

    def validate(self) -> None:
        from .config import arch_config
        from .errors import ConfigError

        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"--batch-size {self.batch_sizes}: every batch size must be at least 1")
        if self.repeats < 1:
            raise ConfigError(f"--repeats {self.repeats}: must be at least 1")
        if self.warmup < 0 or (self.compile and self.warmup < 1):
            raise ConfigError(f"--warmup {self.warmup}: must be 0 or more (1 or more with --compile: it compiles)")
        for arch in self.archs or []:
            arch_config(arch)
        if self.plot is not None:
            if Path(self.plot).suffix.lower() != ".png":
                raise ConfigError(f"--plot {self.plot}: the plot is a .png file")
            if not (self.by_scale or self.breakdown):
                raise ConfigError("--plot draws the time per scale", "add --by-scale")


def bench_point(req: BenchRequest, arch: str | None, batch_size: int, progress: Progress | None) -> dict[str, Any]:
    from .device import pick_device, resolve_dtype
    from .sampling import compile_steps

    dev = pick_device(req.device)
    dt = resolve_dtype(req.dtype, dev)
    dense_model, sparse_model, vae_model, note = load_pair(req.dense, req.sparse, arch, req.vae)
    for m in (dense_model, sparse_model, vae_model):
        m.to(dev)
    if req.compile:
        compile_steps(dense_model), compile_steps(sparse_model)
    result = bench(
        dense_model,
        sparse_model,
        vae_model,
        dev,
        dt,
        batch_size,
        req.repeats,
        req.warmup,
        seed=req.seed,
        progress=progress,
        by_scale=req.by_scale or req.breakdown,
    )
    result.update({"arch": arch or req.dense, "note": note, "compiled": req.compile})
    if req.breakdown:
        result["breakdown"] = breakdown(dense_model, sparse_model, vae_model, dev, dt, batch_size, req.seed)
    return result


def bench_command(req: BenchRequest, progress: Progress | None = None) -> dict[str, Any]:
    """One comparison, or a sweep over architectures and batch sizes (``{"points": [...]}``)."""
    req.validate()
    points = [(a, b) for a in (req.archs or [None]) for b in req.batch_sizes]
    single = len(points) == 1  # one point shows its runs' progress, a sweep its points'
    results = []
    for k, (arch, batch) in enumerate(points):
        results.append(bench_point(req, arch, batch, progress if single else None))
        if progress and not single:
            progress("sweep", k + 1, len(points), f"{arch} batch {batch}")
    out = results[0] if single else {"points": results}
    if req.plot is not None:
        from .plots import scale_plot

        out["plot"] = str(scale_plot(results, req.plot))
    return out
