"""``actvar distill-stage1`` and ``distill-stage2``: one stage of distillation from the dense teacher.

The recipe (named for the model unless ``--config``) with ``--set`` pairs over its keys and the
flags over both, every value checked before any work; the student, its teacher (the base it
recorded, checked by hash) and the VQVAE loaded once; then the library trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import check_not_input
from ..progress import Progress
from ..quant.apply import file_scheme, refuse_quantized
from ..runtime import use_cuda
from ..train.distill import DistillJob, Models, StepDone, run_distillation
from ..train.recipes import Recipe, pick_recipe
from .loading import AUTO, Loaded, load_models, resolve
from .result import Result

PROGRESS_TERMS = ("loss", "cls", "dis_w", "dis_t", "kl", "hidden_mse")


@dataclass
class DistillRequest:
    stage: int
    model: str
    out_dir: Path
    config: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # recipe keys: --set pairs, then the flags
    vae: str | None = None
    teacher: str | None = None  # None: the base checkpoint the model records
    data: str | None = None
    cache_tokens: Path | None = None
    batch_size: int = 8
    epochs: float | None = None
    max_steps: int | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"


@dataclass
class DistillResult(Result):
    summary: dict[str, Any]  # what training.json records
    model: str  # the trained model.safetensors

    def to_dict(self) -> dict[str, Any]:
        return self.summary


def run(req: DistillRequest, progress: Progress | None = None) -> DistillResult:
    source = resolve(req.model)
    check_not_input(Path(req.out_dir) / "model.safetensors", (source,))
    refuse_quantized(file_scheme(source), req.model, "distil the float model, then quantize the result")
    Recipe().override(**req.settings)  # unknown keys fail before anything is loaded
    loaded = _load(source, req.stage, vae=req.vae, teacher=req.teacher)
    job = DistillJob(
        stage=req.stage,
        out_dir=Path(req.out_dir),
        recipe=pick_recipe(req.config, loaded.model.cfg).override(**req.settings),
        data=req.data,
        cache_tokens=req.cache_tokens,
        batch_size=req.batch_size,
        epochs=req.epochs,
        max_steps=req.max_steps,
        resume=req.resume,
        overwrite=req.overwrite,
        cuda=use_cuda(req.device),
    )
    job.validate()
    models = training_models(loaded)

    def on_event(ev) -> None:
        if progress and isinstance(ev, StepDone):
            terms = " ".join(f"{k} {ev.terms[k]:.4f}" for k in PROGRESS_TERMS if k in ev.terms)
            progress(f"stage {req.stage}", ev.step, ev.total_steps, f"{terms} | {ev.samples_per_s:.1f} samples/s")

    summary = run_distillation(job, models, on_event, progress)
    return DistillResult(summary, str(Path(req.out_dir) / "model.safetensors"))


def training_models(loaded: Loaded) -> Models:
    """What the library trains: the student, its checked teacher and VQVAE, and their identities."""
    refuse_quantized(loaded.info.quantization, loaded.info.name, "distil the float model, then quantize the result")
    return Models(
        student=loaded.model,
        teacher=loaded.teacher,
        vae=loaded.vae,
        sources={"model": loaded.source, "teacher": loaded.teacher_source, "vae": loaded.vae_source},
        ids={"model": loaded.model_id, "teacher": loaded.teacher_id, "vae": loaded.vae_id},
        metadata=loaded.info.metadata,
    )


def load_training_models(model: str, *, stage: int = 2, vae: str | None = None, teacher: str | None = None) -> Models:
    """``training_models`` of a model named as on the command line (on the CPU)."""
    return training_models(_load(model, stage, vae=vae, teacher=teacher))


def _load(model: str, stage: int, *, vae: str | None, teacher: str | None) -> Loaded:
    """The student, teacher and VQVAE. Stage 1 needs an ActVAR model (routers, selectors); stage 2
    also trains a dense model that runs some scales without guidance (guidance distillation)."""
    loaded = load_models(model, vae=vae, teacher=teacher or AUTO, actvar=stage == 1, sparse=True)
    if loaded.model.policy and loaded.model.policy.guidance_sharpen:
        raise ConfigError(
            f"{model} sharpens its unguided scales (cfg-sharp): that replaces training, it is not trained",
            "distill a model made with --method cfg-off:N instead",
        )
    if not loaded.model.is_actvar and not (loaded.model.policy and loaded.model.policy.guidance_off):
        raise ConfigError(
            f"{model} has nothing for stage 2 to train",
            "convert it with `actvar moefy`, or turn guidance off (`actvar moefy MODEL --method cfg-off:N`)",
        )
    return loaded
