"""``actvar bench``: measured speed of dense vs ActVAR generation, beside the FLOPs' ideal.

Two checkpoints (the ActVAR model must have been made from the dense one), or ``--arch``:
random weights converted in memory, since timing does not depend on the weights. Several
architectures or batch sizes make a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..convert.moefy import MoefyOptions, moefy
from ..errors import ConfigError
from ..generation.sampling import compile_steps
from ..measure.memory import check_fits, generation_plan
from ..measure.plots import scale_plot
from ..measure.timing import bench, breakdown
from ..models.checkpoint import load_vae, read_checkpoint
from ..models.config import BUILTIN_NAME, VAEConfig, arch_config
from ..models.random_weights import random_vae, random_var
from ..progress import Progress
from ..runtime import Runtime
from ..sparsity.methods import last
from ..sparsity.policy import SparsityPolicy
from .loading import load_models, resolve, vae_for
from .result import Result

SWEEP_ARCHS = ("tiny", "d12", "d16", "d20")
SWEEP_BATCHES = (1, 4, 8)


@dataclass
class BenchRequest:
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
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"--batch-size {self.batch_sizes}: every batch size must be at least 1")
        if self.repeats < 1:
            raise ConfigError(f"--repeats {self.repeats}: must be at least 1")
        if self.warmup < 0 or (self.compile and self.warmup < 1):
            raise ConfigError(f"--warmup {self.warmup}: must be 0 or more (1 or more with --compile: it compiles)")
        for arch in self.archs or []:
            arch_config(arch)
        if self.archs and (self.dense or self.sparse):
            raise ConfigError("give --arch or two checkpoints, not both")
        if not self.archs and not (self.dense and self.sparse):
            raise ConfigError("give the dense and the ActVAR checkpoint (or --arch)")
        if self.plot is not None:
            if Path(self.plot).suffix.lower() != ".png":
                raise ConfigError(f"--plot {self.plot}: the plot is a .png file")
            if not (self.by_scale or self.breakdown):
                raise ConfigError("--plot draws the time per scale", "add --by-scale")


@dataclass
class BenchResult(Result):
    points: list[dict[str, Any]]  # one per (architecture, batch size)
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.points[0]) if len(self.points) == 1 else {"points": self.points}
        if self.plot:
            out["plot"] = self.plot
        return out


@dataclass
class Pair:
    dense: Any
    sparse: Any
    vae: Any
    note: str = ""


def run(req: BenchRequest, progress: Progress | None = None) -> BenchResult:
    """One comparison, or a sweep over architectures and batch sizes."""
    req.validate()
    runtime = Runtime.pick(req.device, req.dtype)
    for arch in req.archs or []:
        check_batches_fit(arch_config(arch), req.batch_sizes, runtime)
    points = [(a, b) for a in (req.archs or [None]) for b in req.batch_sizes]
    single = len(points) == 1  # one point shows its runs' progress, a sweep its points'
    results = []
    pair = None if req.archs else _files(req, runtime)
    for k, (arch, batch) in enumerate(points):
        if arch is not None and (k == 0 or points[k - 1][0] != arch):
            pair = random_pair(arch, req.vae, runtime)
        results.append(_point(req, pair, batch, runtime, progress if single else None) | {"arch": arch or req.dense})
        if progress and not single:
            progress("sweep", k + 1, len(points), f"{arch} batch {batch}")
    plot = str(scale_plot(results, req.plot)) if req.plot is not None else None
    return BenchResult(results, plot)


def _point(req: BenchRequest, pair: Pair, batch_size: int, runtime: Runtime, progress) -> dict[str, Any]:
    if req.compile:
        compile_steps(pair.dense), compile_steps(pair.sparse)
    result = bench(
        pair.dense,
        pair.sparse,
        pair.vae,
        runtime=runtime,
        batch_size=batch_size,
        repeats=req.repeats,
        warmup=req.warmup,
        seed=req.seed,
        progress=progress,
        by_scale=req.by_scale or req.breakdown,
    )
    result.update({"note": pair.note, "compiled": req.compile})
    if req.breakdown:
        result["breakdown"] = breakdown(
            pair.dense, pair.sparse, pair.vae, runtime=runtime, batch_size=batch_size, seed=req.seed
        )
    return result


def check_batches_fit(cfg, batch_sizes: list[int], runtime: Runtime) -> None:
    """Both models and the largest batch's generation must fit, before anything is built."""
    plan = generation_plan(cfg, batch_size=max(batch_sizes), dtype=runtime.dtype)
    plan.components["second_model"] = plan.components["weights"]
    check_fits(plan, runtime.device, f"batch {max(batch_sizes)} of {cfg.depth}-block models")


def _files(req: BenchRequest, runtime: Runtime) -> Pair:
    """The two checkpoints; the ActVAR one must have been made from the dense one."""
    _, info = read_checkpoint(resolve(req.dense))
    if info.var_config is not None:
        check_batches_fit(info.var_config, req.batch_sizes, runtime)
    sparse = load_models(req.sparse, vae=False, teacher=req.dense, runtime=runtime, sparse=True)
    dense = sparse.teacher
    if req.vae is not None:
        return Pair(dense, sparse.model, vae_for(dense, resolve(req.vae), runtime))
    return Pair(dense, sparse.model, *_default_vae(dense.cfg, runtime))


def random_pair(arch: str, vae: str | None, runtime: Runtime) -> Pair:
    """Random weights of ``arch``, converted in memory with the paper's default policy (router and
    selector from weight statistics: no calibration is needed to time it)."""
    cfg = arch_config(arch)
    dense = random_var(cfg, seed=0).to(runtime.device)
    policy = SparsityPolicy(scales=last(len(cfg.patch_nums), 2))
    sparse, _ = moefy(random_var(cfg, seed=0), None, MoefyOptions(calib_images=0, policy=policy), runtime=runtime)
    if vae is not None:
        vae_model, note = vae_for(dense, resolve(vae), runtime), ""
    else:
        vae_model, note = _default_vae(cfg, runtime)
    notes = [f"random {arch} weights, converted in memory with the default policy", note]
    return Pair(dense, sparse, vae_model, "; ".join(n for n in notes if n))


def _default_vae(cfg, runtime: Runtime) -> tuple[Any, str]:
    """tiny's own VQVAE for tiny; otherwise one of the right shape with random weights (the decode
    is timed once per model, and its time does not depend on the weights)."""
    if cfg.dense == arch_config(BUILTIN_NAME):
        return load_vae(BUILTIN_NAME, cfg.patch_nums)[0].to(runtime.device), ""
    vae_cfg = VAEConfig(patch_nums=cfg.patch_nums)
    return random_vae(vae_cfg).to(runtime.device), f"decode timed with a random-weight VQVAE (ch={vae_cfg.ch})"
