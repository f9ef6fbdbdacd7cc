"""``demo``: the whole job on the built-in reference model, in a few minutes on a CPU.

moefy -> stage 1 -> stage 2 -> the dense, converted and distilled models measured side by
side on the shapes yardstick (class accuracy, FID) and against the dense model (token
agreement, KL) -> one picture with a row per model -> FLOPs and measured speed. Everything
lands in one folder, with ``summary.json`` and ``compare.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import images, shapes
from .agreement import teacher_agreement
from .bench import bench
from .checkpoint import atomic_write_text, load_vae, load_var
from .config import BUILTIN_NAME
from .conversion import MoefyOptions, convert_checkpoint
from .distill import DistillJob, StepDone, run_distillation
from .errors import OutputError
from .fidelity import ArraySet, fidelity
from .flops import count_flops
from .progress import Progress
from .recipes import Recipe, load_recipe
from .sample_job import generate_images

Step = Callable[[str], None]  # announces each step
ROWS = ("dense", "converted", "distilled")


@dataclass(frozen=True)
class DemoSettings:
    stage1_steps: int = 40
    stage2_steps: int = 60
    batch_size: int = 16
    eval_images: int = 200  # samples per model for class accuracy and FID
    agreement_pyramids: int = 32
    bench_repeats: int = 3
    seed: int = 0


def _distil(out: Path, recipe: Recipe, s: DemoSettings, progress: Progress | None) -> Path:
    def on_event(ev) -> None:
        if progress and isinstance(ev, StepDone):
            progress(f"stage {stage}", ev.step, ev.total_steps)

    model = out / "actvar.safetensors"
    for stage, steps in ((1, s.stage1_steps), (2, s.stage2_steps)):
        job = DistillJob(
            stage=stage,
            model=str(model),
            out_dir=out / f"stage{stage}",
            recipe=recipe,
            batch_size=s.batch_size,
            max_steps=steps,
            overwrite=True,
        )
        run_distillation(job, on_event)
        model = out / f"stage{stage}" / "model.safetensors"
    return model


def _measure(models: dict[str, Any], vae, s: DemoSettings, progress: Progress | None) -> dict[str, dict]:
    """Class accuracy and FID of each model's samples, and its agreement with the dense model."""
    cpu = torch.device("cpu")
    labels = [i % models["dense"].num_classes for i in range(s.eval_images)]
    rows = {}
    for i, (name, model) in enumerate(models.items()):
        imgs = generate_images(model, vae, labels, s.seed, s.batch_size, cpu, policy=model.policy)
        scores = fidelity(ArraySet(imgs), "shapes", fid=True, labels=labels, device=cpu)
        agree = teacher_agreement(
            model,
            models["dense"],
            vae,
            s.agreement_pyramids,
            s.batch_size,
            s.seed,
            cpu,
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
        generate_images(m, vae, labels, seed, num_classes, torch.device("cpu"), policy=m.policy)
        for m in models.values()
    ]
    names = [shapes.CLASSES[c].name if num_classes == shapes.NUM_CLASSES else str(c) for c in labels]
    images.save_png(path, images.labelled_grid(rows, list(models), names))
    return path


def run_demo(
    out_dir: str | Path, s: DemoSettings = DemoSettings(), step: Step | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file", "give a folder")
    out.mkdir(parents=True, exist_ok=True)
    say = step or (lambda _: None)
    recipe = load_recipe(BUILTIN_NAME)
    say(f"1/5 moefy: {recipe.experts} experts per FFN; router and selector fitted on {recipe.calib_images} images")
    opts = MoefyOptions(
        num_experts=recipe.experts, split=recipe.split, policy=recipe.policy(), calib_images=recipe.calib_images
    )
    convert_checkpoint(BUILTIN_NAME, out / "actvar.safetensors", opts, progress=progress)
    say(f"2/5 distillation: stage 1 ({s.stage1_steps} steps), stage 2 ({s.stage2_steps} steps)")
    distilled_path = _distil(out, recipe, s, progress)
    dense, _ = load_var(BUILTIN_NAME)
    vae, _ = load_vae(BUILTIN_NAME, dense.cfg.patch_nums)
    models = {
        "dense": dense,
        "converted": load_var(out / "actvar.safetensors")[0],
        "distilled": load_var(distilled_path)[0],
    }
    say(f"3/5 measuring each model on {s.eval_images} samples (shapes yardstick) and against the dense model")
    rows = _measure(models, vae, s, progress)
    say("4/5 compare.png: a row per model, the same classes and seeds in every column")
    picture = _compare_picture(models, vae, out / "compare.png", s.seed)
    say("5/5 FLOPs and measured speed (dense vs distilled)")
    final = models["distilled"]
    flops = count_flops(final.cfg.replace(num_experts=0), final.policy, final.cfg.num_experts)
    speed = bench(dense, final, vae, torch.device("cpu"), "fp32", batch_size=8, repeats=s.bench_repeats, warmup=1)
    summary = {
        "models": rows,
        "flops_savings": flops.savings,
        "ideal_speedup": flops.dense_flops / flops.sparse_flops,
        "measured_speedup": speed["speedup"],
        "measured_speedup_end_to_end": speed["speedup_end_to_end"],
        "model": str(distilled_path),
        "compare": str(picture),
        "grid": str(picture),
        "settings": s.__dict__,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=float))
    return summary
