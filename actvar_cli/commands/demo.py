"""``actvar demo``: the whole job on the built-in reference model, in a few minutes on a CPU.

moefy -> stage 1 -> stage 2 -> the dense, converted and distilled models measured side by
side on the shapes yardstick (class accuracy, FID) and against the dense model (token
agreement, KL) -> one picture with a row per model -> FLOPs and measured speed. Everything
lands in one folder, with ``summary.json`` and ``compare.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OutputError
from ..files import atomic_write_text
from ..generation import images
from ..generation.jobs import generate_images
from ..measure.agreement import teacher_agreement
from ..measure.fidelity import ArraySet, fidelity
from ..measure.timing import bench
from ..models.checkpoint import load_var
from ..models.config import BUILTIN_NAME
from ..progress import Progress
from ..reference import shapes
from ..runtime import CPU
from ..sparsity.flops import count_flops
from . import distill, moefy
from .loading import load_models
from .result import Result

ROWS = ("dense", "converted", "distilled")


@dataclass(frozen=True)
class DemoRequest:
    out_dir: Path = Path("actvar-demo")
    stage1_steps: int = 40
    stage2_steps: int = 60
    batch_size: int = 16
    eval_images: int = 200  # samples per model for class accuracy and FID
    agreement_pyramids: int = 32
    bench_repeats: int = 3
    seed: int = 0
    announce: Callable[[str], None] | None = field(default=None, compare=False)  # one line per step


@dataclass
class DemoResult(Result):
    models: dict[str, dict[str, float]]
    flops_savings: float
    ideal_speedup: float
    measured_speedup: float
    measured_speedup_end_to_end: float
    model: str
    compare: str
    settings: dict[str, Any]


def run(req: DemoRequest, progress: Progress | None = None) -> DemoResult:
    if req.stage1_steps < 1 or req.stage2_steps < 1:
        raise ConfigError("--stage1-steps and --stage2-steps must be at least 1")
    out = Path(req.out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file", "give a folder")
    out.mkdir(parents=True, exist_ok=True)
    say = req.announce or (lambda _: None)
    say("1/5 moefy: experts per FFN, router and selector fitted on self-generated images (recipe tiny)")
    converted = out / "actvar.safetensors"
    moefy.run(moefy.MoefyRequest(BUILTIN_NAME, converted), progress)
    say(f"2/5 distillation: stage 1 ({req.stage1_steps} steps), stage 2 ({req.stage2_steps} steps)")
    model = converted
    for stage, steps in ((1, req.stage1_steps), (2, req.stage2_steps)):
        job = distill.DistillRequest(
            stage, str(model), out / f"stage{stage}", batch_size=req.batch_size, max_steps=steps, overwrite=True
        )
        model = Path(distill.run(job, progress).model)
    dense = load_models(BUILTIN_NAME)
    models = {"dense": dense.model, "converted": load_var(converted)[0], "distilled": load_var(model)[0]}
    say(f"3/5 measuring each model on {req.eval_images} samples (shapes yardstick) and against the dense model")
    rows = _measure(models, dense.vae, req, progress)
    say("4/5 compare.png: a row per model, the same classes and seeds in every column")
    picture = _compare_picture(models, dense.vae, out / "compare.png", req.seed)
    say("5/5 FLOPs and measured speed (dense vs distilled)")
    final = models["distilled"]
    flops = count_flops(final.cfg.replace(num_experts=0), final.policy, final.cfg.num_experts)
    speed = bench(dense.model, final, dense.vae, runtime=CPU, batch_size=8, repeats=req.bench_repeats, warmup=1)
    settings = {k: v for k, v in asdict(req).items() if k not in ("out_dir", "announce")}
    result = DemoResult(
        models=rows,
        flops_savings=flops.savings,
        ideal_speedup=flops.dense_flops / flops.sparse_flops,
        measured_speedup=speed["speedup"],
        measured_speedup_end_to_end=speed["speedup_end_to_end"],
        model=str(model),
        compare=str(picture),
        settings=settings,
    )
    atomic_write_text(out / "summary.json", json.dumps(result.to_dict(), indent=1, default=float))
    return result


def _measure(models: dict[str, Any], vae, req: DemoRequest, progress: Progress | None) -> dict[str, dict]:
    """Class accuracy and FID of each model's samples, and its agreement with the dense model."""
    labels = [i % models["dense"].num_classes for i in range(req.eval_images)]
    rows = {}
    for i, (name, model) in enumerate(models.items()):
        imgs = generate_images(
            model, vae, labels, seed=req.seed, batch_size=req.batch_size, runtime=CPU, policy=model.policy
        )
        scores = fidelity(ArraySet(imgs), "shapes", fid=True, labels=labels)
        agree = teacher_agreement(
            model,
            models["dense"],
            vae,
            num=req.agreement_pyramids,
            batch_size=req.batch_size,
            seed=req.seed,
            policy=model.policy,
            psnr_images=0,
        )
        rows[name] = {
            "class_accuracy": scores["class_accuracy"],
            "fid": scores["fid"],
            "token_agreement": agree["token_agreement"],
            "logit_kl": agree["logit_kl"],
        }
        if progress:
            progress("measuring", i + 1, len(models))
    return rows


def _compare_picture(models: dict[str, Any], vae, path: Path, seed: int) -> Path:
    """One row per model, one column per class, the same seeds in every row."""
    num_classes = models["dense"].num_classes
    labels = list(range(num_classes))
    rows = [
        generate_images(m, vae, labels, seed=seed, batch_size=num_classes, runtime=CPU, policy=m.policy)
        for m in models.values()
    ]
    names = [shapes.CLASSES[c].name if num_classes == shapes.NUM_CLASSES else str(c) for c in labels]
    images.save_png(path, images.labelled_grid(rows, list(models), names))
    return path
