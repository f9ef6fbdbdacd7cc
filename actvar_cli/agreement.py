"""Agreement with the dense teacher: how closely an ActVAR model follows the model it came from.

Measured on held-out token pyramids that the teacher samples (seeded away from every seed a
training run uses): per-scale token agreement and KL under teacher forcing, and the PSNR
between images the two models generate from the same seeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .device import autocast
from .model import VAR
from .policy import SparsityPolicy
from .progress import Progress
from .sampling import SamplingOptions, decode_images, generate, image_generators, image_seed
from .vqvae import VQVAE

EVAL_SEED_OFFSET = 1_000_003  # held-out: far from the seeds training samples use


def held_out_labels(seed: int, ids: list[int], num_classes: int, device) -> torch.Tensor:
    return torch.tensor([image_seed(seed + 1, i) % num_classes for i in ids], device=device)


def held_out_rng(seed: int, ids: list[int], device) -> list[torch.Generator]:
    """The generators of held-out images: image i of evaluation ``seed``."""
    return image_generators(seed + EVAL_SEED_OFFSET, ids, device)


def held_out_batches(teacher: VAR, vae: VQVAE, num: int, batch_size: int, seed: int, device, dtype, opts):
    """(ids, labels, teacher generation, teacher-forcing input) batches sampled by the teacher,
    seeded away from every seed a training run uses."""
    eval_seed = seed + EVAL_SEED_OFFSET
    for s in range(0, num, batch_size):
        ids = list(range(s, min(num, s + batch_size)))
        labels = held_out_labels(eval_seed, ids, teacher.num_classes, device)
        with autocast(device, dtype):
            gen = generate(teacher, vae, labels, opts, rng=held_out_rng(seed, ids, device))
            x = vae.quantize.idx_to_var_input(gen.tokens)
        yield ids, labels, gen, x


@torch.no_grad()
def routing_agreement(
    student: VAR,
    teacher: VAR,
    vae: VQVAE,
    num: int = 16,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
    temperature: float = 1.0,
) -> dict[str, float]:
    """How often routers pick the experts, and selectors the tokens, that stage 1's
    pseudo-labels name (held-out teacher pyramids); with the distillation losses."""
    from .losses import stage1_loss

    device = torch.device(device)
    segments = student.sparse_segments(student.policy)
    sums: dict[str, float] = {}
    count = 0
    for _, labels, gen, x in held_out_batches(teacher, vae, num, batch_size, seed, device, dtype, SamplingOptions()):
        with autocast(device, dtype):
            out = student.forward_train(labels, x, student.policy, collect_aux=True)
            _, terms = stage1_loss(student, out, torch.cat(gen.tokens, 1), segments, 0.0, 0.0, temperature)
        for k in ("router_agreement", "selector_agreement", "dis_w", "dis_t"):
            sums[k] = sums.get(k, 0.0) + float(terms[k]) * len(labels)
        count += len(labels)
    return {k: v / count for k, v in sums.items()}


@torch.no_grad()
def teacher_agreement(
    student: VAR,
    teacher: VAR,
    vae: VQVAE,
    num: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
    policy: SparsityPolicy | None = None,
    opts: SamplingOptions = SamplingOptions(),
    psnr_images: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """On ``num`` teacher-sampled pyramids (held out from training), under teacher forcing:
    per scale, how often the student's argmax token is the teacher's and KL(teacher || student);
    and the PSNR between teacher and student images generated from the same seeds (for the
    first ``psnr_images`` of those pyramids, at most ``num``)."""
    device = torch.device(device)
    policy = policy if policy is not None else student.policy
    S = len(student.cfg.patch_nums)
    agree, kl, count = np.zeros(S), np.zeros(S), 0
    n_img = num if psnr_images is None else min(psnr_images, num)
    psnr: list[float] = []
    for ids, labels, gen, x in held_out_batches(teacher, vae, num, batch_size, seed, device, dtype, opts):
        with autocast(device, dtype):
            t_logits = teacher.forward_train(labels, x).logits.float()
            s_logits = student.forward_train(labels, x, policy).logits.float()
        t_logp, s_logp = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
        kl_tok = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # B, L
        same = (t_logits.argmax(-1) == s_logits.argmax(-1)).float()
        for si, (bg, ed) in enumerate(student.begin_ends):
            agree[si] += same[:, bg:ed].mean(1).sum().item()
            kl[si] += kl_tok[:, bg:ed].mean(1).sum().item()
        count += len(labels)
        k = max(0, min(len(ids), n_img - ids[0]))  # how many of this batch's images enter the PSNR
        if k:
            psnr += image_psnr(student, vae, gen.f_hat[:k], labels[:k], ids[:k], seed, device, dtype, policy, opts)
        if progress:
            progress("teacher forcing", count, num)
    agree, kl = agree / count, kl / count
    sparse = sorted({s - 1 for s in (policy.scales if policy else ())})
    per_scale = [
        {"scale": si + 1, "tokens": pn * pn, "sparse": si in sparse, "token_agreement": agree[si], "logit_kl": kl[si]}
        for si, pn in enumerate(student.cfg.patch_nums)
    ]
    result: dict[str, Any] = {
        "num": num,
        "token_agreement": float(np.mean([agree[i] for i in sparse])) if sparse else float(agree.mean()),
        "logit_kl": float(np.mean([kl[i] for i in sparse])) if sparse else float(kl.mean()),
        "token_agreement_all_scales": float(agree.mean()),
        "logit_kl_all_scales": float(kl.mean()),
        "per_scale": per_scale,
    }
    if psnr:
        result["psnr_db"] = float(np.mean(psnr))
    return result


@torch.no_grad()
def image_psnr(student, vae, teacher_fhat, labels, ids, seed, device, dtype, policy, opts) -> list[float]:
    """PSNR (dB) of each teacher image against the student's image from the same per-image seed."""
    with autocast(device, dtype):
        gen = generate(student, vae, labels, opts, rng=held_out_rng(seed, ids, device), policy=policy)
    mse = (decode_images(vae, teacher_fhat) - decode_images(vae, gen.f_hat)).square().flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).tolist()
