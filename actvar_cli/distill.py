"""Two-stage distillation of an ActVAR model from its dense teacher, on Accelerate.

Stage 1 trains only routers and selectors (supp. eq. 19); stage 2 freezes them and trains
the experts, attention and head (supp. eq. 22). The same code runs on a CPU, one GPU, or
``accelerate launch`` on many processes (DDP; gloo on CPUs). Batches are a pure function
of (seed, step, micro-step, rank), so a run resumed from a checkpoint continues exactly as
an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import atomic_write_text, load_vae, load_var, save_model, stored_json
from .data import (
    ImageFolderSource,
    TeacherSource,
    TokenCacheSource,
    TokenSource,
    encode_image_folder,
    is_token_cache,
    sample_ids,
    steps_for,
)
from .errors import ConfigError, OutputError
from .hub import find_teacher, find_vae, resolve_local
from .losses import stage1_loss, stage2_loss
from .model import VAR
from .recipes import Recipe
from .sampling import SamplingOptions, image_seed

OnStep = Callable[[dict[str, Any]], None]

STAGE1_TRAINABLE = ("ffn.router.", "selector.")
STAGE2_TRAINABLE = ("ffn.fc1.", "ffn.fc2.", "attn.", "head.")


@dataclass
class DistillJob:
    stage: int
    model: str
    out_dir: Path
    recipe: Recipe = field(default_factory=Recipe)
    vae: str | None = None
    teacher: str | None = None
    data: str | None = None
    cache_tokens: Path | None = None
    batch_size: int = 8  # per process and micro-step
    epochs: float | None = None
    max_steps: int | None = None
    resume: bool = False
    device: str = "auto"


class TrainState:
    """The optimizer step reached; saved and restored with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.step = int(d["step"])


class StudentForward(torch.nn.Module):
    """Makes ``forward_train`` the module's forward, so that DDP sees (and syncs) it."""

    def __init__(self, model: VAR):
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, x: torch.Tensor, collect_aux: bool):
        out = self.model.forward_train(labels, x, self.model.policy, collect_aux=collect_aux)
        return {"out": out}


def trainable_names(stage: int) -> tuple[str, ...]:
    return STAGE1_TRAINABLE if stage == 1 else STAGE2_TRAINABLE


def select_trainable(model: VAR, stage: int) -> list[torch.nn.Parameter]:
    """Stage 1: routers and selectors. Stage 2: experts (fc1/fc2), attention and the head."""
    prefixes = trainable_names(stage)
    params = []
    for name, p in model.named_parameters():
        inner = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        train = any(inner.startswith(pre) for pre in prefixes) and not (stage == 2 and "router" in inner)
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def lr_lambda(total: int, warmup: float, lr_end: float) -> Callable[[int], float]:
    """Upstream VAR's schedule: linear warm-up from 0.5% of the peak, then linear decay to ``lr_end``."""
    wp = max(1, round(warmup * total))

    def f(step: int) -> float:
        if step < wp:
            return 0.005 + (1 - 0.005) * step / wp
        return 1 - (1 - lr_end) * min(1.0, (step - wp) / max(1, total - wp))

    return f


def latest_complete_checkpoint(out_dir: Path) -> tuple[Path, int] | None:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = []
    for d in root.iterdir():
        marker = d / "complete.json"
        if d.is_dir() and d.name.startswith("checkpoint_") and marker.exists():
            done.append((int(d.name.split("_")[-1]), d))
    if not done:
        return None
    number, path = max(done)
    return path, number


def open_source(job: DistillJob, recipe: Recipe, teacher: VAR, vae, device, progress: OnStep | None) -> TokenSource:
    spec = job.data or recipe.data
    patch_nums = teacher.cfg.patch_nums
    if spec == "teacher":
        opts = SamplingOptions(cfg=recipe.teacher_cfg, top_k=recipe.teacher_top_k, top_p=recipe.teacher_top_p)
        return TeacherSource(teacher, vae, recipe.teacher_samples_per_epoch, opts, recipe.seed, device)
    path = Path(spec)
    if is_token_cache(path):
        return TokenCacheSource(path, patch_nums)
    if job.cache_tokens is not None:

        def report(done: int, total: int) -> None:
            if progress:
                progress({"event": "encode", "done": done, "total": total})

        cache = encode_image_folder(
            path, vae, job.cache_tokens, patch_nums, recipe.seed, device=device, progress=report
        )
        return TokenCacheSource(cache, patch_nums)
    return ImageFolderSource(path, vae, patch_nums, recipe.seed, device)


class _QuietRotation(logging.Filter):
    """Accelerate logs every checkpoint rotation as a warning; it is routine here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "to make room for new checkpoint" not in record.getMessage()


logging.getLogger("accelerate.accelerator").addFilter(_QuietRotation())


def run_distillation(job: DistillJob, on_step: OnStep | None = None) -> dict[str, Any]:
    """Train one stage; rank 0 writes ``model.safetensors`` and ``metrics.jsonl`` to ``job.out_dir``."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

    if job.stage not in (1, 2):
        raise ConfigError(f"stage {job.stage} does not exist (1 or 2)")
    if job.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    recipe = job.recipe
    use_cuda = torch.cuda.is_available() and job.device != "cpu"
    state = PartialState(cpu=not use_cuda)
    world, rank = state.num_processes, state.process_index
    accum = max(1, math.ceil(recipe.global_batch / (job.batch_size * world)))
    global_batch = job.batch_size * world * accum
    precision = recipe.precision if recipe.precision != "auto" else ("bf16" if use_cuda else "fp32")
    out_dir = Path(job.out_dir)
    if state.is_main_process:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create {out_dir}: {e.strerror}") from e
    state.wait_for_everyone()
    acc = Accelerator(
        cpu=not use_cuda,
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=accum,
        project_config=ProjectConfiguration(
            project_dir=str(out_dir), automatic_checkpoint_naming=True, total_limit=recipe.keep_checkpoints
        ),
    )
    device = acc.device

    student, info = load_var(resolve_local(job.model))
    if info.kind != "actvar":
        raise ConfigError(f"{job.model} is a dense VAR", "convert it first with `actvar moefy`")
    teacher_src = find_teacher(info.metadata, job.teacher)
    teacher, _ = load_var(teacher_src)
    if teacher.cfg != student.cfg.replace(num_experts=0):
        raise ConfigError(f"the teacher {teacher_src} does not have the student's architecture")
    vae_src = find_vae(info.metadata, job.vae)
    vae, _ = load_vae(vae_src, student.cfg.patch_nums)
    for m in (student, teacher, vae):
        m.to(device)
    teacher.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    student.train()
    params = select_trainable(student, job.stage)
    policy = student.policy
    segments = student.sparse_segments(policy)
    if not segments:
        raise ConfigError("the model's policy makes nothing sparse", "check its scales and rates")

    source = open_source(job, recipe, teacher, vae, device, on_step if acc.is_main_process else None)
    n = len(source)
    epochs = (
        job.epochs if job.epochs is not None else (recipe.stage1_epochs if job.stage == 1 else recipe.stage2_epochs)
    )
    total = steps_for(epochs, n, global_batch)
    if job.max_steps is not None:
        total = min(total, job.max_steps) if job.epochs is not None else job.max_steps
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.stage_lr(job.stage),
        betas=tuple(recipe.betas),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, recipe.warmup, recipe.lr_end))
    wrapper, optimizer = acc.prepare(StudentForward(student), optimizer)
    train_state = TrainState()
    acc.register_for_checkpointing(scheduler)
    acc.register_for_checkpointing(train_state)

    metrics_path = out_dir / "metrics.jsonl"
    if job.resume:
        found = latest_complete_checkpoint(out_dir)
        if found is None:
            raise ConfigError(f"--resume: no complete checkpoint under {out_dir / 'checkpoints'}")
        acc.load_state(str(found[0]))
        acc.project_configuration.iteration = found[1] + 1
        if acc.is_main_process and metrics_path.exists():  # drop records past the checkpoint
            kept = [
                ln for ln in metrics_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= train_state.step
            ]
            atomic_write_text(metrics_path, "".join(ln + "\n" for ln in kept))
    elif acc.is_main_process and metrics_path.exists():
        metrics_path.unlink()

    base = {
        "stage": job.stage,
        "total_steps": total,
        "global_batch": global_batch,
        "num_processes": world,
        "grad_accum": accum,
        "data": source.description,
    }
    if on_step and acc.is_main_process:
        on_step({"event": "start", "step": train_state.step, **base})
    started = time.perf_counter()
    start_step = train_state.step
    last_terms: dict[str, float] = {}
    while train_state.step < total:
        step = train_state.step
        sums: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        for micro in range(accum):
            items = sample_ids(step, micro, rank, job.batch_size, world, global_batch, n, recipe.seed, source.shuffle)
            batch = source.batch(items).to(device)
            g = torch.Generator().manual_seed(image_seed(recipe.seed + 31, (step * accum + micro) * world + rank))
            drop = torch.rand(batch.labels.shape[0], generator=g).to(device) < recipe.cond_drop_rate
            labels = torch.where(drop, torch.full_like(batch.labels, student.num_classes), batch.labels)
            with torch.no_grad():
                x = vae.quantize.idx_to_var_input(batch.tokens)
            gt = torch.cat(batch.tokens, dim=1)
            with acc.accumulate(wrapper):
                with acc.autocast():
                    out = wrapper(labels, x, job.stage == 1)["out"]
                    if job.stage == 1:
                        loss, terms = stage1_loss(
                            student, out, gt, segments, recipe.alpha, recipe.beta, recipe.pseudo_label_temperature
                        )
                    else:
                        with torch.no_grad():
                            t_out = teacher.forward_train(labels, x)
                        loss, terms = stage2_loss(out, t_out, gt)
                acc.backward(loss)
                if acc.sync_gradients:
                    terms["grad_norm"] = acc.clip_grad_norm_(params, recipe.grad_clip).detach().float()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + (v if k == "grad_norm" else v / accum)  # grad_norm: last micro-step
        scheduler.step()
        train_state.step += 1
        reduced = acc.reduce(torch.stack([sums[k].to(device) for k in sums]), "mean").tolist()  # the step's one sync
        mean_terms = dict(zip(sums, reduced))
        per_rank = acc.gather(torch.tensor([job.batch_size * accum], device=device)).tolist()
        dt = time.perf_counter() - t0
        record = {
            "step": train_state.step,
            "epoch": train_state.step * global_batch / n,
            "lr": scheduler.get_last_lr()[0],
            **{k: round(v, 6) for k, v in mean_terms.items()},
            "samples_per_s": global_batch / dt,
            "elapsed_s": time.perf_counter() - started,
            "samples_per_rank": per_rank,
        }
        last_terms = mean_terms
        if acc.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if on_step:
                on_step({"event": "step", **base, **record})
        if train_state.step % recipe.checkpoint_every == 0 or train_state.step == total:
            acc.save_state()
            acc.wait_for_everyone()
            if acc.is_main_process:
                last = max((out_dir / "checkpoints").iterdir(), key=lambda d: int(d.name.split("_")[-1]))
                atomic_write_text(last / "complete.json", json.dumps({"step": train_state.step}))
    acc.wait_for_everyone()

    summary = {
        **base,
        "steps": train_state.step,
        "resumed_from_step": start_step if job.resume else None,
        "epochs": train_state.step * global_batch / n,
        "per_process_batch": job.batch_size,
        "final_losses": {k: round(v, 6) for k, v in last_terms.items()},
        "teacher": teacher_src,
        "vae": vae_src,
        "recipe": recipe.to_dict(),
        "seconds": time.perf_counter() - started,
        "samples_per_s": (train_state.step - start_step) * global_batch / max(1e-9, time.perf_counter() - started),
        "actvar_version": __version__,
    }
    if acc.is_main_process:
        final = acc.unwrap_model(wrapper).model
        final.eval().requires_grad_(False)
        meta = {
            k: v
            for k, v in info.metadata.items()
            if k not in ("format", "format_version", "kind", "var_config", "policy")
        }
        history = stored_json(info, "training") or []
        meta["training"] = [*history, {k: v for k, v in summary.items() if k != "recipe"}]
        meta.update({"stage": job.stage, "num_processes": world, "global_batch": global_batch, "vae": vae_src})
        save_model(final, out_dir / "model.safetensors", meta)
        atomic_write_text(out_dir / "training.json", json.dumps(summary, indent=1, default=str))
    acc.wait_for_everyone()
    acc.end_training()
    return summary
