"""``actvar compare``: every way of making a VAR cheaper, on one yardstick.

Every method name and parameter is checked before any model is built; the dense base is read
once, each converted method works on a copy of it, and an ``actvar:PATH`` model must have been
made from the base (checked by hash).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..convert.method_models import MethodBuilder
from ..errors import ConfigError
from ..measure.compare import CompareSettings, measure_methods
from ..measure.plots import compare_plot
from ..progress import Progress
from ..runtime import Runtime
from ..sparsity.stacks import parse_stack, stack_policy
from .loading import check_made_from, load_models
from .result import Result


@dataclass
class CompareRequest:
    base: str
    methods: list[str]
    vae: str | None = None
    settings: CompareSettings = field(default_factory=CompareSettings)
    device: str = "auto"
    dtype: str = "auto"
    plot: Path | None = None


@dataclass
class CompareResult(Result):
    base: str
    device: str
    dtype: str
    batch_size: int
    repeats: int
    num: int
    ref: str | None
    methods: list[dict[str, Any]]
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out["plot"] is None:
            del out["plot"]
        return out


def run(req: CompareRequest, progress: Progress | None = None) -> CompareResult:
    settings = req.settings
    settings.validate()
    if req.plot is not None and Path(req.plot).suffix.lower() != ".png":
        raise ConfigError(f"--plot {req.plot}: the plot is a .png file")
    runtime = Runtime.pick(req.device, req.dtype)
    base = load_models(req.base, vae=req.vae, runtime=runtime)
    specs = ["dense"] + [s for s in req.methods if s.strip() != "dense"]
    twice = sorted({s.strip() for s in specs if [t.strip() for t in specs].count(s.strip()) > 1})
    if twice:
        raise ConfigError(f"--methods lists {', '.join(twice)} more than once", "name each method once")
    for spec in specs:  # every name, parameter and stack checked before any work
        stack_policy(parse_stack(spec), len(base.model.cfg.patch_nums))

    def load_actvar(path: str):
        student = load_models(path, vae=False, runtime=runtime, sparse=True)
        check_made_from(student.info, student.model, base.model, base.source)
        return student.model

    builder = MethodBuilder(base.model, base.vae, seed=settings.seed, runtime=runtime, load_actvar=load_actvar)
    methods = []
    for i, spec in enumerate(specs):
        methods.append(builder.build(spec))
        if progress:
            progress("building methods", i + 1, len(specs))
    rows = measure_methods(methods, base.vae, settings, runtime=runtime, progress=progress)
    plot = str(compare_plot(rows, req.plot, settings.ref)) if req.plot is not None else None
    return CompareResult(
        base=req.base,
        device=str(runtime.device),
        dtype=runtime.dtype,
        batch_size=settings.batch_size,
        repeats=settings.repeats,
        num=settings.num if settings.ref else 0,
        ref=settings.ref,
        methods=rows,
        plot=plot,
    )
