"""Two-stage distillation of an ActVAR model from its dense teacher, on Accelerate.

Stage 1 trains only routers and selectors (supp. eq. 19); stage 2 freezes them and trains
the experts, attention and head (supp. eq. 22). The same code runs on a CPU, one GPU, or
``accelerate launch`` on many processes (DDP; gloo on CPUs). Batches are a pure function
of (seed, step, micro-step, rank), so a run resumed from a checkpoint continues exactly as
an uninterrupted one would. A run is set up, trained step by step, checkpointed and
finished by the phases below; its folder (``run.json``) records which run it holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState

from .. import __version__
from ..errors import ConfigError
from ..files import FolderLock, atomic_write_text
from ..generation.sampling import image_seed
from ..models.checkpoint import save_model, user_metadata
from ..models.var import VAR
from ..progress import Progress
from .data import TokenSource, open_source, sample_ids, steps_for
from .losses import guided_logits, stage1_loss, stage2_loss
from .optimizer import lr_lambda, make_optimizer
from .recipes import Recipe
from .run_folder import RunFolder, run_identity


@dataclass
class DistillJob:
    """How one stage trains (the models come separately, as ``Models``)."""

    stage: int
    out_dir: Path
    recipe: Recipe = field(default_factory=Recipe)
    data: str | None = None  # teacher, shapes, an ImageFolder or a token cache [the recipe's]
    cache_tokens: Path | None = None
    batch_size: int = 8  # per process and micro-step
    epochs: float | None = None
    max_steps: int | None = None
    resume: bool = False
    overwrite: bool = False  # start afresh in a folder that holds another run
    cuda: bool = False  # train on the GPU(s) when present

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ConfigError(f"stage {self.stage} does not exist (1 or 2)")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs {self.epochs}: must be more than 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps {self.max_steps}: must be at least 1")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out-dir and --overwrite discards it: give one")
        self.recipe.validate()


@dataclass
class Models:
    """The student, its dense teacher and their VQVAE, with what identifies each (a sha256 or
    ``builtin:NAME``) and where each came from, for the run record."""

    student: VAR
    teacher: VAR
    vae: Any
    sources: dict[str, str]  # model, teacher, vae: a path or a name
    ids: dict[str, str]  # model, teacher, vae: sha256 or builtin:NAME
    metadata: dict[str, str]  # the student file's metadata (carried into the trained file)


@dataclass(frozen=True)
class RunStart:
    """Sent once, before the first step (``step`` > 0 when resuming)."""

    stage: int
    step: int
    total_steps: int
    global_batch: int
    num_processes: int
    grad_accum: int
    data: str


@dataclass(frozen=True)
class StepDone:
    """Sent after every optimizer step (on the main process)."""

    step: int
    total_steps: int
    epoch: float
    lr: float
    terms: dict[str, float]  # the loss terms of the stage, averaged over micro-steps and processes
    samples_per_s: float
    elapsed_s: float
    samples_per_rank: list[int]

    def record(self) -> dict[str, Any]:
        """The line written to metrics.jsonl."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "lr": self.lr,
            **{k: round(v, 6) for k, v in self.terms.items()},
            "samples_per_s": self.samples_per_s,
            "elapsed_s": self.elapsed_s,
            "samples_per_rank": self.samples_per_rank,
        }


DistillEvent = RunStart | StepDone
OnEvent = Callable[[DistillEvent], None]


@dataclass
class Run:
    """Everything one run holds while it trains."""

    job: DistillJob
    acc: Any  # accelerate.Accelerator
    student: VAR
    wrapper: torch.nn.Module  # the student as Accelerate prepared it (DDP on many processes)
    teacher: VAR
    vae: Any
    params: list[torch.nn.Parameter]
    optimizer: Any
    source: TokenSource
    folder: RunFolder
    models: Models
    accum: int
    total: int
    step: int = 0
    started_at: int = 0  # the step this process started (or resumed) from
    last_terms: dict[str, float] = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.job.batch_size * self.acc.num_processes * self.accum

    @property
    def lr_factor(self) -> float:
        return lr_lambda(self.total, self.job.recipe.warmup, self.job.recipe.lr_end)(self.step)


class StudentForward(torch.nn.Module):
    """Makes ``forward_train`` the module's forward, so that DDP sees (and syncs) it."""

    def __init__(self, model: VAR):
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, x: torch.Tensor, collect_aux: bool):
        return {"out": self.model.forward_train(labels, x, self.model.policy, collect_aux=collect_aux)}


class _QuietRotation(logging.Filter):
    """Accelerate logs routine checkpoint chatter as warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "to make room for new checkpoint" not in record.getMessage()


logging.getLogger("accelerate.accelerator").addFilter(_QuietRotation())


# ---------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------


def _accelerator(job: DistillJob):

    cuda = job.cuda and torch.cuda.is_available()
    state = PartialState(cpu=not cuda)
    accum = max(1, math.ceil(job.recipe.global_batch / (job.batch_size * state.num_processes)))
    precision = job.recipe.precision if job.recipe.precision != "auto" else ("bf16" if cuda else "fp32")
    acc = Accelerator(
        cpu=not cuda, mixed_precision="bf16" if precision == "bf16" else "no", gradient_accumulation_steps=accum
    )
    return acc, accum


def _prepare_models(models: Models, device) -> None:
    """On the training device: teacher and VQVAE frozen, the student in training mode."""
    for m in (models.student, models.teacher, models.vae):
        m.to(device)
    models.teacher.eval().requires_grad_(False)
    models.vae.eval().requires_grad_(False)
    models.student.train()
    if models.student.delta_scale(models.student.policy) is None:
        raise ConfigError("the model's policy changes nothing to distil", "check its scales, rates and cfg-off")


def setup(job: DistillJob, models: Models, progress: Progress | None = None) -> Run:
    """Validate, build the optimizer and take over (or resume) the run folder."""
    job.validate()
    acc, accum = _accelerator(job)
    folder = RunFolder(Path(job.out_dir), acc.is_main_process)
    _prepare_models(models, acc.device)
    student = models.student
    job = replace(job, recipe=job.recipe.with_policy(student.policy))  # the model's policy is what trains
    params, optimizer = make_optimizer(student, job.stage, job.recipe)
    wrapper, optimizer = acc.prepare(StudentForward(student), optimizer)
    source = open_source(
        job.data or job.recipe.data,
        recipe=job.recipe,
        teacher=models.teacher,
        vae=models.vae,
        vae_id=models.ids["vae"],
        device=acc.device,
        cache_tokens=job.cache_tokens,
        progress=progress if acc.is_main_process else None,
    )
    n = len(source)
    epochs = (
        job.epochs
        if job.epochs is not None
        else (job.recipe.stage1_epochs if job.stage == 1 else job.recipe.stage2_epochs)
    )
    total = steps_for(epochs, n, job.batch_size * acc.num_processes * accum)
    if job.max_steps is not None:
        total = min(total, job.max_steps) if job.epochs is not None else job.max_steps
    run = Run(
        job=job,
        acc=acc,
        student=student,
        wrapper=wrapper,
        teacher=models.teacher,
        vae=models.vae,
        params=params,
        optimizer=optimizer,
        source=source,
        folder=folder,
        models=models,
        accum=accum,
        total=total,
    )
    identity = run_identity(job, models.ids, run.global_batch, total, source.description)
    if job.resume:
        run.step = folder.resume(identity, student, optimizer)
    else:
        found = folder.check_free(job.overwrite)
        acc.wait_for_everyone()  # every process has looked before the main one writes
        folder.start(identity, found)
    acc.wait_for_everyone()
    run.started_at = run.step
    return run


def train_step(run: Run) -> StepDone:
    """One optimizer step: ``accum`` micro-steps on this process's share of the global batch."""
    job, acc, recipe = run.job, run.acc, run.job.recipe
    for group in run.optimizer.param_groups:
        group["lr"] = recipe.stage_lr(job.stage) * run.lr_factor
    world, rank, n = acc.num_processes, acc.process_index, len(run.source)
    sums: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for micro in range(run.accum):
        items = sample_ids(
            step=run.step,
            micro=micro,
            rank=rank,
            per_process=job.batch_size,
            world=world,
            global_batch=run.global_batch,
            n=n,
            seed=recipe.seed,
            shuffle=run.source.shuffle,
        )
        batch = run.source.batch(items).to(acc.device)
        g = torch.Generator().manual_seed(image_seed(recipe.seed + 31, (run.step * run.accum + micro) * world + rank))
        drop = torch.rand(batch.labels.shape[0], generator=g).to(acc.device) < recipe.cond_drop_rate
        labels = torch.where(drop, torch.full_like(batch.labels, run.student.num_classes), batch.labels)
        with torch.no_grad():
            x = run.vae.quantize.idx_to_var_input(batch.tokens)
        terms = _micro_step(run, labels, x, torch.cat(batch.tokens, dim=1))
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + (v if k == "grad_norm" else v / run.accum)  # grad_norm: last micro-step
    run.step += 1
    reduced = acc.reduce(torch.stack([sums[k].to(acc.device) for k in sums]), "mean").tolist()  # the step's one sync
    run.last_terms = dict(zip(sums, reduced))
    per_rank = acc.gather(torch.tensor([job.batch_size * run.accum], device=acc.device)).tolist()
    return StepDone(
        step=run.step,
        total_steps=run.total,
        epoch=run.step * run.global_batch / n,
        lr=run.optimizer.param_groups[0]["lr"],
        terms=run.last_terms,
        samples_per_s=run.global_batch / (time.perf_counter() - t0),
        elapsed_s=0.0,
        samples_per_rank=per_rank,
    )


def _micro_step(run: Run, labels: torch.Tensor, x: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    acc, recipe, student = run.acc, run.job.recipe, run.student
    with acc.accumulate(run.wrapper):
        with acc.autocast():
            out = run.wrapper(labels, x, run.job.stage == 1)["out"]
            if run.job.stage == 1:
                loss, terms = stage1_loss(
                    student,
                    out,
                    gt,
                    segments=student.sparse_segments(student.policy),
                    alpha=recipe.alpha,
                    beta=recipe.beta,
                    temperature=recipe.pseudo_label_temperature,
                    router_target=recipe.router_target,
                )
            else:
                loss, terms = _stage2(run, out, labels, x, gt)
        acc.backward(loss)
        if acc.sync_gradients:
            terms["grad_norm"] = acc.clip_grad_norm_(run.params, recipe.grad_clip).detach().float()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return terms


def _stage2(run: Run, out, labels: torch.Tensor, x: torch.Tensor, gt: torch.Tensor):
    """Stage 2's loss: from the first scale the policy changes (where the deltas start; before it the
    student is the teacher), with the guided teacher as the target where guidance is off."""
    student, recipe, policy = run.student, run.job.recipe, run.student.policy
    S = len(student.cfg.patch_nums)
    with torch.no_grad():
        t_out = run.teacher.forward_train(labels, x)
        guided_from = None
        if policy.guidance_off:
            first = S - policy.guidance_off
            uncond = run.teacher.forward_train(torch.full_like(labels, student.num_classes), x).logits
            cfg = recipe.stage2_cfg
            t_out.logits = guided_logits(t_out.logits, uncond, labels, cfg=cfg, model=student, first=first)
            guided_from = student.begin_ends[first][0]
    first_changed = student.delta_scale(policy)
    start = student.begin_ends[first_changed][0] if student.cfg.delta_rank else 0
    return stage2_loss(out, t_out, gt, start=start, kl=recipe.stage2_kl, guided_from=guided_from)


def finish(run: Run, seconds: float) -> dict[str, Any]:
    """The summary; rank 0 writes model.safetensors (with the training history) and training.json."""
    job = run.job
    summary = {
        "stage": job.stage,
        "total_steps": run.total,
        "global_batch": run.global_batch,
        "num_processes": run.acc.num_processes,
        "grad_accum": run.accum,
        "data": run.source.description,
        "steps": run.step,
        "resumed_from_step": run.started_at if job.resume else None,
        "epochs": run.step * run.global_batch / len(run.source),
        "per_process_batch": job.batch_size,
        "final_losses": {k: round(v, 6) for k, v in run.last_terms.items()},
        "teacher": run.models.sources["teacher"],
        "vae": run.models.sources["vae"],
        "recipe": job.recipe.to_dict(),
        "seconds": seconds,
        "samples_per_s": (run.step - run.started_at) * run.global_batch / max(1e-9, seconds),
        "actvar_version": __version__,
    }
    if run.acc.is_main_process:
        final = run.acc.unwrap_model(run.wrapper).model
        final.eval().requires_grad_(False)
        meta = user_metadata(run.models.metadata)
        history = json.loads(meta["training"]) if "training" in meta else []
        meta["training"] = [*history, {k: v for k, v in summary.items() if k != "recipe"}]
        meta.update({"stage": job.stage, "num_processes": run.acc.num_processes, "global_batch": run.global_batch})
        meta["vae"] = run.models.sources["vae"]
        save_model(final, run.folder.root / "model.safetensors", meta)
        atomic_write_text(run.folder.root / "training.json", json.dumps(summary, indent=1, default=str))
    return summary


def run_distillation(
    job: DistillJob, models: Models, on_event: OnEvent | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Train one stage; rank 0 writes ``model.safetensors`` and ``metrics.jsonl`` to ``job.out_dir``,
    and holds the folder's lock meanwhile (a second run of the same folder is refused)."""
    job.validate()
    main = PartialState(cpu=not (job.cuda and torch.cuda.is_available())).is_main_process
    with FolderLock(job.out_dir) if main else contextlib.nullcontext():
        return _train(job, models, on_event, progress)


def _train(job: DistillJob, models: Models, on_event: OnEvent | None, progress: Progress | None) -> dict[str, Any]:
    run = setup(job, models, progress)
    main = run.acc.is_main_process
    if on_event and main:
        on_event(
            RunStart(
                stage=job.stage,
                step=run.step,
                total_steps=run.total,
                global_batch=run.global_batch,
                num_processes=run.acc.num_processes,
                grad_accum=run.accum,
                data=run.source.description,
            )
        )
    started = time.perf_counter()
    while run.step < run.total:
        done = train_step(run)
        done = StepDone(**{**done.__dict__, "elapsed_s": time.perf_counter() - started})
        if main:
            run.folder.append_metrics(done.record())
            if on_event:
                on_event(done)
        if run.step % job.recipe.checkpoint_every == 0 or run.step == run.total:
            run.folder.save_checkpoint(run.step, run.student, run.optimizer, job.recipe.keep_checkpoints)
            run.acc.wait_for_everyone()
    run.acc.wait_for_everyone()
    summary = finish(run, time.perf_counter() - started)
    run.acc.wait_for_everyone()
    run.acc.end_training()
    return summary
