"""``actvar tune``: the cheapest stack of methods that keeps FID within a cap, written as a model file.

The search space is every stack of a guidance part, a token rule, an expert rule and scale skipping
(``measure/tune.py``), plus each ``--candidates`` model (distilled ActVAR files made from the base)
alone and without guidance at its last scales. The chosen stack is built once more and written with
``save_model``: a file every command runs, which records the stack and the search that chose it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..convert.method_models import MethodBuilder
from ..errors import ConfigError
from ..files import check_output_file, sha256_file
from ..measure.fidelity import cache_dir, check_cache_writable, check_reference
from ..measure.plots import tune_plot
from ..measure.tune import TuneCache, Tuner, TuneSettings, search_space
from ..models.checkpoint import save_model
from ..progress import Progress
from ..runtime import Runtime
from .loading import Loaded, check_made_from, load_models, resolve
from .result import Result


@dataclass
class TuneRequest:
    base: str
    out: Path
    settings: TuneSettings
    candidates: list[str] = field(default_factory=list)  # distilled ActVAR files made from the base
    vae: str | None = None
    cache: Path | None = None  # evaluated points [ACTVAR_CACHE/tune]
    plot: Path | None = None
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class TuneResult(Result):
    report: dict[str, Any]
    output: str | None
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.report, "output": self.output, "plot": self.plot}


def run(req: TuneRequest, progress: Progress | None = None) -> TuneResult:
    req.settings.validate()
    candidates = [resolve(c) for c in req.candidates]
    missing = [c for c in candidates if not Path(c).is_file()]
    if missing:
        hint = "give a model file that actvar moefy or distillation wrote"
        raise ConfigError(f"--candidates {missing[0]}: no such file", hint)
    check_output_file(Path(req.out), (".safetensors",), (resolve(req.base), *candidates))
    if req.plot is not None and Path(req.plot).suffix.lower() != ".png":
        raise ConfigError(f"--plot {req.plot}: the plot is a .png file")
    check_reference(req.settings.ref)
    check_cache_writable()
    runtime = Runtime.pick(req.device, req.dtype)
    base = load_models(req.base, vae=req.vae, runtime=runtime)
    builder = _builder(base, req, runtime)
    stacks = search_space(len(base.model.cfg.patch_nums), candidates)
    dense = builder.build("dense")
    cache = TuneCache(req.cache or cache_dir().parent / "tune", base.model_id, {c: sha256_file(c) for c in candidates})
    tuner = Tuner(builder.build, dense, base.vae, req.settings, runtime, cache, progress)
    report = tuner.search(stacks)
    output = _write(builder, report.chosen, base, req) if report.chosen else None
    plot = None
    if req.plot is not None:
        points = [p.__dict__ for p in report.points]
        plot = str(tune_plot(points, req.plot, cap=report.cap, dense_fid=report.dense_fid, chosen=report.chosen))
    return TuneResult(report.to_dict(), output, plot)


def _builder(base: Loaded, req: TuneRequest, runtime: Runtime) -> MethodBuilder:
    """Conversions and candidate files made once each, however many stacks use them."""
    loaded: dict[str, Any] = {}

    def load_actvar(path: str):
        if path not in loaded:
            student = load_models(path, vae=False, runtime=runtime, sparse=True)
            check_made_from(student.info, student.model, base.model, base.source)
            loaded[path] = student.model
        return loaded[path]

    return MethodBuilder(base.model, base.vae, seed=req.settings.seed, runtime=runtime, load_actvar=load_actvar)


def _write(builder: MethodBuilder, stack: str, base: Loaded, req: TuneRequest) -> str:
    method = builder.build(stack)
    method.model.policy = method.policy
    builtin = base.info.format == "builtin"
    meta = {
        "base_checkpoint": base.info.name,
        "base_checkpoint_path": base.source if builtin else str(Path(base.source).resolve()),
        "base_sha256": "" if builtin else sha256_file(base.source),
        "vae": base.vae_source,
        "method": stack,
        "tuned": {
            "max_fid_ratio": req.settings.max_fid_ratio,
            "objective": req.settings.objective,
            "ref": req.settings.ref,
            "seed": req.settings.seed,
        },
        "actvar_version": __version__,
    }
    save_model(method.model, req.out, meta)
    return str(req.out)
