"""Agreement with the dense teacher: how closely an ActVAR model follows the model it came from.

Measured on held-out token pyramids that the teacher samples (seeded away from every seed a
training run uses): per-scale token agreement and KL under teacher forcing, and the PSNR
between images the two models generate from the same seeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..generation.sampling import SamplingOptions, decode_images, generate, image_generators, image_seed
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..progress import Progress
from ..runtime import CPU, Runtime
from ..sparsity.policy import SparsityPolicy

EVAL_SEED_OFFSET = 1_000_003  # held-out: far from the seeds training samples use


def held_out_labels(seed: int, ids: list[int], num_classes: int, device) -> torch.Tensor:
    return torch.tensor([image_seed(seed + 1, i) % num_classes for i in ids], device=device)


def held_out_rng(seed: int, ids: list[int], device) -> list[torch.Generator]:
    """The generators of held-out images: image i of evaluation ``seed``."""
    return image_generators(seed + EVAL_SEED_OFFSET, ids, device)


def held_out_batches(
    teacher: VAR, vae: VQVAE, *, num: int, batch_size: int, seed: int, runtime: Runtime, opts: SamplingOptions
):
    """(ids, labels, teacher generation, teacher-forcing input) batches sampled by the teacher,
    seeded away from every seed a training run uses."""
    eval_seed = seed + EVAL_SEED_OFFSET
    device = runtime.device
    for s in range(0, num, batch_size):
        ids = list(range(s, min(num, s + batch_size)))
        labels = held_out_labels(eval_seed, ids, teacher.num_classes, device)
        with runtime.autocast():
            gen = generate(teacher, vae, labels, opts, rng=held_out_rng(seed, ids, device))
            x = vae.quantize.idx_to_var_input(gen.tokens)
        yield ids, labels, gen, x


@torch.no_grad()
def teacher_agreement(
    student: VAR,
    teacher: VAR,
    vae: VQVAE,
    *,
    num: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    runtime: Runtime = CPU,
    policy: SparsityPolicy | None = None,
    opts: SamplingOptions = SamplingOptions(),
    psnr_images: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """On ``num`` teacher-sampled pyramids (held out from training), under teacher forcing:
    per scale, how often the student's argmax token is the teacher's and KL(teacher || student);
    and the PSNR between teacher and student images generated from the same seeds (for the
    first ``psnr_images`` of those pyramids, at most ``num``)."""
    policy = policy if policy is not None else student.policy
    S = len(student.cfg.patch_nums)
    agree, kl, count = np.zeros(S), np.zeros(S), 0
    n_img = num if psnr_images is None else min(psnr_images, num)
    psnr: list[float] = []
    batches = held_out_batches(teacher, vae, num=num, batch_size=batch_size, seed=seed, runtime=runtime, opts=opts)
    for ids, labels, gen, x in batches:
        with runtime.autocast():
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
            with runtime.autocast():
                mine = generate(student, vae, labels[:k], opts, rng=held_out_rng(seed, ids[:k], runtime.device),
                                policy=policy)  # fmt: skip
            psnr += image_psnr(decode_images(vae, gen.f_hat[:k]), decode_images(vae, mine.f_hat))
        if progress:
            progress("teacher forcing", count, num)
    return _summary(student, policy, agree=agree / count, kl=kl / count, num=num, psnr=psnr)


def _summary(student: VAR, policy, *, agree, kl, num: int, psnr: list[float]) -> dict[str, Any]:
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


def image_psnr(teacher_B3HW: torch.Tensor, student_B3HW: torch.Tensor) -> list[float]:
    """PSNR (dB) of each pair of images in [0, 1]."""
    mse = (teacher_B3HW - student_B3HW).square().flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).tolist()
