"""Training the built-in reference model from scratch on a CPU (``actvar train-reference``).

Three phases, each resumable from its newest checkpoint, then a measurement:

1. the VQVAE, and the shapes classifier on the same batches (clean images and, once the
   VQVAE draws shapes, its reconstructions, so that the classifier judges content and not
   the codec's blur);
2. the VAR, by teacher forcing on the VQVAE's tokens of fresh images (10% of labels dropped
   for classifier-free guidance), with every scale's mean cross-entropy weighted equally, so
   that the coarse scales learn early; optionally followed by a tail with upstream's loss
   (every token weighted equally), which gives the fine scales their share;
3. the exported fp16 weights are measured: reconstruction PSNR and classifier accuracy on
   held-out images, and the class accuracy of the VAR's samples.

Batch ``k`` of a phase is a pure function of (phase, k), so a resumed run repeats an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..files import atomic_write_text, atomic_write_with
from ..models.builtin import WEIGHT_FILES, WEIGHTS_DIR
from ..models.checkpoint import save_safetensors
from ..models.config import REFERENCE_VAE_CONFIG, REFERENCE_VAR_CONFIG
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..progress import Progress
from . import shapes
from .classifier import ShapesClassifier
from .export import export_weights, measure, psnr_db

# train-stream indices of each phase never overlap
PHASE_OFFSET = {"vqvae": 0, "var": 50_000_000, "var_tail": 60_000_000}


@dataclass(frozen=True)
class ReferenceSettings:
    """Hyperparameters of the reference run (written into its training record)."""

    seed: int = 0
    vae_steps: int = 6000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_beta: float = 0.25  # commitment weight (upstream)
    dead_code_every: int = 20  # steps between restarts of unused codes
    classifier_lr: float = 2e-3
    classifier_recon_from: float = 0.3  # share of phase 1 after which reconstructions join its batches
    var_steps: int = 3600
    var_batch: int = 32
    var_lr: float = 1e-3
    var_tail_steps: int = 0  # then steps of upstream's token-uniform loss (docs/quality.md: little gain)
    var_tail_lr: float = 3e-4
    var_weight_decay: float = 0.05
    var_autocast_bf16: bool = True  # bf16 matmuls (fp32 weights and optimizer): 2.6x the fp32 rate on this CPU
    cond_drop_rate: float = 0.1
    warmup: float = 0.03
    checkpoint_every: int = 250
    eval_images: int = 500


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    wp = max(1, round(warmup * total))
    if step < wp:
        return peak * (step + 1) / wp
    t = (step - wp) / max(1, total - wp)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_batch(phase: str, k: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``k`` of a phase: images in [-1, 1] (B, 3, H, W) and labels, from the train stream."""
    start = PHASE_OFFSET[phase] + k * batch
    imgs, labels = shapes.images("train", range(start, start + batch))
    return shapes.to_model_input(imgs), torch.from_numpy(labels)


def init_var_weights(model: VAR, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02):
    """Upstream VAR's ``init_weights`` for training from scratch (std sqrt(1/(3C)))."""
    std = math.sqrt(1 / model.cfg.embed_dim / 3)
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.trunc_normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)
    model.head.weight.data.mul_(init_head)
    model.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
    C = model.cfg.embed_dim
    for block in model.blocks:
        block.attn.proj.weight.data.div_(math.sqrt(2 * len(model.blocks)))
        block.ffn.fc2.weight.data.div_(math.sqrt(2 * len(model.blocks)))
        block.ada_lin[-1].weight.data[2 * C :].mul_(init_adaln)
        block.ada_lin[-1].weight.data[: 2 * C].mul_(init_adaln_gamma)


class Checkpoints:
    """A phase's newest state: weights (safetensors), optimizers (tensors only) and a JSON log."""

    def __init__(self, folder: Path, phase: str):
        self.dir = folder / phase
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, step: int, modules: dict[str, torch.nn.Module], optims: dict[str, Any], log: list, seconds: float):

        for name, m in modules.items():
            save_safetensors(m.state_dict(), self.dir / f"{name}.safetensors", {})
        for name, o in optims.items():
            atomic_write_with(self.dir / f"{name}.opt", lambda tmp, o=o: torch.save(o.state_dict(), tmp))
        state = {"step": step, "seconds": seconds, "log": log}
        atomic_write_text(self.dir / "state.json", json.dumps(state))  # written last: marks the checkpoint whole

    def seconds(self) -> float:
        return json.loads((self.dir / "state.json").read_text())["seconds"]

    def load(self, modules: dict[str, torch.nn.Module], optims: dict[str, Any]) -> tuple[int, list, float]:
        """(step, log, seconds spent so far); (0, [], 0.0) when the phase has not started."""

        state = self.dir / "state.json"
        if not state.exists():
            return 0, [], 0.0
        for name, m in modules.items():
            m.load_state_dict(load_file(self.dir / f"{name}.safetensors"))
        for name, o in optims.items():
            o.load_state_dict(torch.load(self.dir / f"{name}.opt", weights_only=True))
        data = json.loads(state.read_text())
        return data["step"], data["log"], data["seconds"]


def restart_dead_codes(vae: VQVAE, usage_V: torch.Tensor, f_BChw: torch.Tensor, g: torch.Generator) -> int:
    """Codes unused lately take the value of random encoder vectors (scaled down: residuals are small)."""
    dead = (usage_V < 0.05).nonzero().view(-1)
    if len(dead):
        pool = f_BChw.detach().permute(0, 2, 3, 1).reshape(-1, f_BChw.shape[1])
        pick = torch.randint(len(pool), (len(dead),), generator=g)
        vae.quantize.embedding.weight.data[dead] = pool[pick] * torch.rand(len(dead), 1, generator=g)
        usage_V[dead] = 1.0
    return len(dead)


def train_vqvae(out: Path, s: ReferenceSettings, progress: Progress | None) -> tuple[VQVAE, ShapesClassifier, list]:
    """Phase 1: the VQVAE (MSE + VQ loss) and the classifier, on the same batches."""
    torch.manual_seed(s.seed)
    vae, clf = VQVAE(REFERENCE_VAE_CONFIG), ShapesClassifier()
    vae.quantize.embedding.weight.data.uniform_(-1 / vae.cfg.vocab_size, 1 / vae.cfg.vocab_size)
    opt_v = torch.optim.AdamW(vae.parameters(), s.vae_lr, betas=(0.9, 0.95), weight_decay=0.0)
    opt_c = torch.optim.AdamW(clf.parameters(), s.classifier_lr, betas=(0.9, 0.99), weight_decay=1e-4)
    ckpt = Checkpoints(out, "vqvae")
    step, log, spent = ckpt.load({"vqvae": vae, "classifier": clf}, {"vqvae": opt_v, "classifier": opt_c})
    t0 = time.perf_counter() - spent
    usage = torch.ones(vae.cfg.vocab_size)
    g = torch.Generator().manual_seed(s.seed + 1)
    vae.train(), clf.train()
    while step < s.vae_steps:
        x, labels = train_batch("vqvae", step, s.vae_batch)
        f = vae.quant_conv(vae.encoder(x))
        f_hat, vq_loss, used = vae.quantize(f, beta=s.vae_beta)
        rec = vae.decoder(vae.post_quant_conv(f_hat))
        rec_loss = F.mse_loss(rec, x)
        for group in opt_v.param_groups:
            group["lr"] = lr_at(step, s.vae_steps, s.vae_lr, s.warmup)
        opt_v.zero_grad(set_to_none=True)
        (rec_loss + vq_loss).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt_v.step()
        usage.mul_(0.95).add_(torch.bincount(used, minlength=vae.cfg.vocab_size).float())
        if step % s.dead_code_every == s.dead_code_every - 1:
            restart_dead_codes(vae, usage, f, g)
        clf_in = x if step < s.classifier_recon_from * s.vae_steps else torch.cat((x, rec.detach().clamp(-1, 1)))
        clf_loss = classifier_step(clf, opt_c, clf_in, labels.repeat(len(clf_in) // len(x)), step=step, s=s)
        step += 1
        if step % 50 == 0:
            log.append({"step": step, "mse": rec_loss.item(), "vq": vq_loss.item(), "classifier_ce": clf_loss})
        if step % 500 == 0:
            log[-1].update(held_out_check(vae, clf))
        if step % s.checkpoint_every == 0 or step == s.vae_steps:
            ckpt.save(
                step,
                {"vqvae": vae, "classifier": clf},
                {"vqvae": opt_v, "classifier": opt_c},
                log,
                time.perf_counter() - t0,
            )
        if progress:
            progress("vqvae + classifier", step, s.vae_steps)
    return vae.eval(), clf.eval(), {"log": log, "seconds": ckpt.seconds()}


@torch.no_grad()
def held_out_check(vae: VQVAE, clf: ShapesClassifier, num: int = 64) -> dict[str, float]:
    """Reconstruction PSNR and classifier accuracy on the first test images (for the log)."""

    vae.eval(), clf.eval()
    imgs, labels = shapes.images("test", range(num))
    x = shapes.to_model_input(imgs)
    rec = vae.idx_to_img(vae.img_to_idx(x))
    acc = (clf(x)[1].argmax(-1) == torch.from_numpy(labels)).float().mean()
    vae.train(), clf.train()
    return {"held_out_psnr_db": psnr_db(rec, x).mean().item(), "held_out_classifier_accuracy": acc.item()}


def classifier_step(clf: ShapesClassifier, opt, x: torch.Tensor, labels: torch.Tensor, *, step: int, s) -> float:
    for group in opt.param_groups:
        group["lr"] = lr_at(step, s.vae_steps, s.classifier_lr, s.warmup)
    loss = F.cross_entropy(clf(x)[1], labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def scale_balanced_ce(model: VAR, logits_BLV: torch.Tensor, gt_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scale's mean cross-entropy, weighted equally (upstream weights every token equally).

    100 of the reference model's 155 tokens lie in its last two scales: with equal token weights
    a short CPU budget goes to fine texture while the middle scales, which draw the shape and so
    decide the class, stay untrained (18% class accuracy after 500 steps of batch 32)."""
    _, per_scale = _ce(model, logits_BLV, gt_BL)
    return per_scale.mean(), per_scale.detach()


def token_ce(model: VAR, logits_BLV: torch.Tensor, gt_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's loss: every token weighted equally (and each scale's mean, for the log)."""
    ce_BL, per_scale = _ce(model, logits_BLV, gt_BL)
    return ce_BL.mean(), per_scale.detach()


def _ce(model: VAR, logits_BLV: torch.Tensor, gt_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per token (B, L) and its mean over each scale (S,)."""
    ce = F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]), gt_BL.reshape(-1), reduction="none")
    ce_BL = ce.view(gt_BL.shape)
    return ce_BL, torch.stack([ce_BL[:, bg:ed].mean() for bg, ed in model.begin_ends])


@dataclass(frozen=True)
class VarPhase:
    """One stretch of VAR training with its own loss, optimizer and cosine schedule."""

    name: str  # checkpoint folder and stretch of the train stream (PHASE_OFFSET)
    steps: int
    lr: float
    loss: Callable[[VAR, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    first_step: int  # its first step counted over all phases: label drops go on as in one run


def train_var(out: Path, vae: VQVAE, s: ReferenceSettings, progress: Progress | None) -> tuple[VAR, dict]:
    """Phase 2: the VAR by teacher forcing on tokens of fresh images, scale-balanced, then its tail."""
    torch.manual_seed(s.seed + 2)
    model = VAR(REFERENCE_VAR_CONFIG)
    init_var_weights(model)
    phases = [VarPhase("var", s.var_steps, s.var_lr, scale_balanced_ce, 0)]
    if s.var_tail_steps:
        phases.append(VarPhase("var_tail", s.var_tail_steps, s.var_tail_lr, token_ce, s.var_steps))
    runs = [_var_phase(out, phase, model, vae, s=s, progress=progress) for phase in phases]
    tail_log = runs[1]["log"] if len(runs) > 1 else None
    return model.eval(), {"log": runs[0]["log"], "tail_log": tail_log, "seconds": sum(r["seconds"] for r in runs)}


def _var_phase(out: Path, phase: VarPhase, model: VAR, vae: VQVAE, *, s: ReferenceSettings, progress):
    """One resumable VAR phase, on its own stretch of the train stream."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_" not in n and "emb" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_" not in n and "emb" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.var_weight_decay}, {"params": rest, "weight_decay": 0.0}],
        phase.lr,
        betas=(0.9, 0.95),
    )
    ckpt = Checkpoints(out, phase.name)
    step, log, spent = ckpt.load({"var": model}, {"var": opt})
    t0 = time.perf_counter() - spent
    g = torch.Generator().manual_seed(s.seed + 3 + phase.first_step + step)
    model.train()
    while step < phase.steps:
        x_img, labels = train_batch(phase.name, step, s.var_batch)
        with torch.no_grad():
            tokens = vae.img_to_idx(x_img)
            x_in = vae.quantize.idx_to_var_input(tokens)
        drop = torch.rand(len(labels), generator=g) < s.cond_drop_rate
        labels = torch.where(drop, torch.full_like(labels, model.num_classes), labels)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.var_autocast_bf16):
            logits = model(labels, x_in)
        loss, per_scale = phase.loss(model, logits.float(), torch.cat(tokens, 1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, phase.steps, phase.lr, s.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log.append({"step": step, "ce": loss.item(), "ce_per_scale": [round(c, 4) for c in per_scale.tolist()]})
        if step % s.checkpoint_every == 0 or step == phase.steps:
            ckpt.save(step, {"var": model}, {"var": opt}, log, time.perf_counter() - t0)
        if progress:
            progress(phase.name, step, phase.steps)
    model.eval()
    return {"log": log, "seconds": ckpt.seconds()}


def train_reference(out_dir: str | Path, s: ReferenceSettings = ReferenceSettings(), progress: Progress | None = None):
    """Run (or resume) every phase; write fp16 weights and ``record.json`` to ``out_dir``; return the record."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vae, clf, vae_run = train_vqvae(out, s, progress)
    var, var_run = train_var(out, vae.requires_grad_(False), s, progress)
    t0 = time.perf_counter()
    export_weights(out, var, vae, clf)
    quality = measure(out, s.eval_images, s.seed, progress)
    minutes = {"vqvae_and_classifier": vae_run["seconds"] / 60, "var": var_run["seconds"] / 60}
    minutes["measurement"] = (time.perf_counter() - t0) / 60
    minutes["total"] = sum(minutes.values())
    record = {
        "settings": asdict(s),
        "var_config": REFERENCE_VAR_CONFIG.to_dict(),
        "vae_config": REFERENCE_VAE_CONFIG.to_dict(),
        "minutes": minutes,
        "quality": quality,
        "losses": {"vqvae_and_classifier": vae_run["log"], "var": var_run["log"], "var_tail": var_run.get("tail_log")},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "record.json").write_text(json.dumps(record, indent=1))
    return record


def install_weights(out_dir: str | Path) -> list[Path]:
    """Copy the exported weights and the training record into the package (they ship with it)."""

    WEIGHTS_DIR.mkdir(exist_ok=True)
    copied = []
    for name in [*WEIGHT_FILES.values(), "record.json"]:
        shutil.copyfile(Path(out_dir) / name, WEIGHTS_DIR / name)
        copied.append(WEIGHTS_DIR / name)
    return copied
