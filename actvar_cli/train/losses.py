"""The paper's training losses (supplementary section 6), with the readings chosen where the
text is ambiguous (docs/actvar.md explains each):

* pseudo-labels (eqs. 13, 16): a softmax over the top-k scores, zero elsewhere. Distances
  are divided by their mean over the candidates first, so the temperature is scale-free;
* distillation (eqs. 14, 17): KL(target || prediction). The paper writes KL(p || sigma(A)),
  applying the softmax twice and putting the prediction first, which is infinite wherever
  the top-k target is zero;
* load balancing (eqs. 15, 18): GShard/Switch form N * sum_e f_e * P_e (f: share of hard
  assignments, P: mean probability), which is 1 when perfectly balanced;
* stage 2 (eq. 22): L_cls + KL(student || teacher) + mean over blocks of MSE of hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..generation.sampling import SamplingOptions, guide
from ..measure.agreement import held_out_batches
from ..models.var import VAR, TrainOutput
from ..runtime import CPU, Runtime
from ..sparsity.experts import expert_distances, expert_norms
from ..sparsity.policy import SparseSegment
from ..sparsity.tokens import topk_mask


def cls_loss(logits_BLV: torch.Tensor, gt_BL: torch.Tensor) -> torch.Tensor:
    """VAR's classification loss: cross-entropy averaged over every token."""
    return F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]).float(), gt_BL.reshape(-1))


def soft_topk(scores: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """softmax(top-k(scores)) over the last dimension; 0 outside the top k."""
    keep = topk_mask(scores, k)
    return (scores / temperature).masked_fill(~keep, -torch.inf).softmax(-1)


def kl_to_target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) summed over the last dimension, averaged over the rest."""
    logp = logits.float().log_softmax(-1)
    return (torch.xlogy(target, target) - target * logp).sum(-1).mean()


def load_balance(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """N * sum_e f_e P_e over the last dimension (probs, keep: (..., N))."""
    n = probs.shape[-1]
    f = keep.reshape(-1, n).float().sum(0)
    f = f / f.sum().clamp_min(1)
    p = probs.reshape(-1, n).float().mean(0)
    return n * (f * p).sum()


@dataclass
class PseudoLabels:
    router: list[torch.Tensor]  # per segment: (B, n, N) target distribution over experts
    selector: list[torch.Tensor]  # per segment: (B, n) target distribution over the scale's tokens


@torch.no_grad()
def pseudo_labels(
    model: VAR, out: TrainOutput, segments: list[SparseSegment], temperature: float, router_target: str = "distance"
) -> list[PseudoLabels]:
    """Per block: router targets (the experts closest to the full FFN output, or with the largest
    outputs: docs/actvar.md) and selector targets (tokens the full block moves most), from the
    teacher function each block holds."""
    causal = model.attn_bias_for_masking == 0
    labels = []
    for block, aux in zip(model.blocks, out.aux):
        x_in = aux.block_input.detach()
        moved = (block(x_in, out.cond, causal) - x_in).float().square().mean(-1)  # B, L: how far the full block moves
        router_t, selector_t = [], []
        routed = [s for s in segments if s.keep_experts < block.ffn.num_experts]
        for seg, h in zip(routed, aux.ffn_input):
            B, n, C = h.shape
            router_t.append(soft_topk(expert_scores(block.ffn, h, router_target), seg.keep_experts, temperature))
        for seg in (s for s in segments if s.keep_tokens < s.length):
            m = moved[:, seg.start : seg.end]
            selector_t.append(soft_topk(m / m.mean(-1, keepdim=True).clamp_min(1e-12), seg.keep_tokens, temperature))
        labels.append(PseudoLabels(router_t, selector_t))
    return labels


def expert_scores(ffn, h_BnC: torch.Tensor, target: str) -> torch.Tensor:
    """(B, n, N) scores whose top-k names the experts a token should keep, scaled by their mean:
    minus the distance of each expert's output to the FFN's (``distance``, the paper's reading), or
    each expert's output norm (``norm``: dropping the smallest outputs changes the sum least)."""
    B, n, C = h_BnC.shape
    h = h_BnC.reshape(-1, C).float()
    if target == "norm":
        score = expert_norms(ffn, h, ffn.num_experts).to(h_BnC.device)
    else:
        score = -expert_distances(ffn, h, ffn.num_experts).to(h_BnC.device)
    return (score / score.abs().mean(-1, keepdim=True).clamp_min(1e-12)).view(B, n, -1)


def shared_selector_loss(model: VAR, out: TrainOutput, segments: list[SparseSegment], temperature: float):
    """The fixed rule's one choice per scale: block 0's selector at the first sparse scale against the
    tokens that the whole (dense) stack moves most there."""
    seg = next((s for s in segments if s.keep_tokens < s.length), None)
    if seg is None or out.choice_logits is None:
        return None, None
    x0 = out.aux[0].block_input.detach()
    with torch.no_grad():
        causal = model.attn_bias_for_masking == 0
        h = x0
        for block in model.blocks:
            h = block(h, out.cond, causal)
        moved = (h - x0)[:, seg.start : seg.end].float().square().mean(-1)
    target = soft_topk(moved / moved.mean(-1, keepdim=True).clamp_min(1e-12), seg.keep_tokens, temperature)
    logits = out.choice_logits
    return kl_to_target(target, logits), _overlap(topk_mask(logits, seg.keep_tokens), target)


def _mean(xs: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(xs).mean() if xs else like.new_zeros(())


def stage1_loss(
    model: VAR,
    out: TrainOutput,
    gt_BL: torch.Tensor,
    *,
    segments: list[SparseSegment],
    alpha: float,
    beta: float,
    temperature: float = 1.0,
    router_target: str = "distance",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supp. eq. 19: L_cls + sum over blocks of alpha (L_dis^w + L_dis^t) + beta (L_bl^w + L_bl^t);
    with the fixed token rule, L_dis^t is the shared choice's (``shared_selector_loss``)."""
    l_cls = cls_loss(out.logits, gt_BL)
    targets = pseudo_labels(model, out, segments, temperature, router_target)
    dis_w, dis_t, bl_w, bl_t, agree_w, agree_t = [], [], [], [], [], []
    for aux, tgt in zip(out.aux, targets):
        dw = [kl_to_target(t, lg) for t, lg in zip(tgt.router, aux.router_logits)]
        dt = [kl_to_target(t, lg) for t, lg in zip(tgt.selector, aux.selector_logits)]
        bw = [load_balance(lg.softmax(-1), k) for lg, k in zip(aux.router_logits, aux.expert_keep)]
        bt = [load_balance(lg.softmax(-1), k) for lg, k in zip(aux.selector_logits, aux.token_keep)]
        dis_w.append(_mean(dw, l_cls))
        dis_t.append(_mean(dt, l_cls))
        bl_w.append(_mean(bw, l_cls))
        bl_t.append(_mean(bt, l_cls))
        agree_w += [_overlap(k, t) for k, t in zip(aux.expert_keep, tgt.router)]
        agree_t += [_overlap(k, t) for k, t in zip(aux.token_keep, tgt.selector)]
    shared, shared_agree = shared_selector_loss(model, out, segments, temperature)
    if shared is not None:  # one choice for every block: its loss counts once per block, as each block's would
        dis_t = [shared] * len(dis_t)
        agree_t = [shared_agree]
    per_block = alpha * (torch.stack(dis_w) + torch.stack(dis_t)) + beta * (torch.stack(bl_w) + torch.stack(bl_t))
    loss = l_cls + per_block.sum()
    terms = {  # detached tensors: read them once per step, not once per term (each read syncs a GPU)
        "loss": loss,
        "cls": l_cls,
        "dis_w": torch.stack(dis_w).mean(),
        "dis_t": torch.stack(dis_t).mean(),
        "bl_w": torch.stack(bl_w).mean(),
        "bl_t": torch.stack(bl_t).mean(),
        "router_agreement": _mean(agree_w, l_cls),
        "selector_agreement": _mean(agree_t, l_cls),
    }
    return loss, {k: v.detach().float() for k, v in terms.items()}


def _overlap(keep: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of the hard choices that are also in the target's top-k."""
    return ((target > 0) & keep).sum() / keep.sum().clamp_min(1)


def stage2_loss(
    out: TrainOutput,
    teacher: TrainOutput,
    gt_BL: torch.Tensor,
    *,
    start: int = 0,
    kl: str = "reverse",
    guided_from: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supp. eq. 22: L_cls + KL + (1/D) sum_b MSE(student hidden, teacher hidden), over the positions
    from ``start`` on (the first sparse scale's, when the scales before it cannot change). ``kl``:
    ``reverse`` is the paper's KL(p_student || p_teacher), ``forward`` KL(p_teacher || p_student).

    From ``guided_from`` on (the scales that run without guidance) the teacher's logits are its
    guided ones: there only the KL applies, since the data and the teacher's conditional hidden
    states are not what those scales should now produce."""
    end = out.logits.shape[1] if guided_from is None else max(start, guided_from)
    logits_s, logits_t = out.logits[:, start:], teacher.logits[:, start:]
    l_cls = cls_loss(logits_s[:, : end - start], gt_BL[:, start:end]) if end > start else logits_s.new_zeros(())
    logp_s = logits_s.float().log_softmax(-1)
    logp_t = logits_t.float().log_softmax(-1)
    first, second = (logp_s, logp_t) if kl == "reverse" else (logp_t, logp_s)
    l_f = (first.exp() * (first - second)).sum(-1).mean()
    pairs = zip(out.hidden, teacher.hidden)
    l_b = (
        torch.stack([F.mse_loss(s[:, start:end].float(), t[:, start:end].float()) for s, t in pairs]).mean()
        if end > start
        else logits_s.new_zeros(())
    )
    loss = l_cls + l_f + l_b
    agree = (logits_s.argmax(-1) == logits_t.argmax(-1)).float().mean()
    terms = {"loss": loss, "cls": l_cls, "kl": l_f, "hidden_mse": l_b, "token_agreement": agree}
    return loss, {k: v.detach().float() for k, v in terms.items()}


def guided_logits(
    cond_BLV: torch.Tensor, uncond_BLV: torch.Tensor, labels_B: torch.Tensor, *, cfg: float, model: VAR, first: int
) -> torch.Tensor:
    """The teacher's logits with guidance as sampling applies it (``(1 + t) c - t u``, t = cfg times
    the scale's ratio) at the scales from ``first`` on, for rows with a class; the rest as given."""
    S = len(model.cfg.patch_nums)
    t_L = cfg * model.lvl_1L[0].float() / (S - 1)  # the scale's ratio at each position
    t_L = torch.where(model.lvl_1L[0] >= first, t_L, torch.zeros_like(t_L))
    t_BL = t_L[None, :] * (labels_B < model.num_classes).float()[:, None]  # dropped labels: unguided
    t = t_BL[..., None]
    return guide(cond_BLV.float(), uncond_BLV.float(), t).to(cond_BLV.dtype)


@torch.no_grad()
def routing_agreement(
    student: VAR, teacher: VAR, vae, *, num: int = 16, batch_size: int = 8, seed: int = 0, runtime: Runtime = CPU
) -> dict[str, float]:
    """How often routers pick the experts, and selectors the tokens, that stage 1's pseudo-labels
    name (on held-out teacher pyramids); with the distillation losses."""
    segments = student.sparse_segments(student.policy)
    sums: dict[str, float] = {}
    count = 0
    batches = held_out_batches(
        teacher, vae, num=num, batch_size=batch_size, seed=seed, runtime=runtime, opts=SamplingOptions()
    )
    for _, labels, gen, x in batches:
        with runtime.autocast():
            out = student.forward_train(labels, x, student.policy, collect_aux=True)
            _, terms = stage1_loss(student, out, torch.cat(gen.tokens, 1), segments=segments, alpha=0.0, beta=0.0)
        for k in ("router_agreement", "selector_agreement", "dis_w", "dis_t"):
            sums[k] = sums.get(k, 0.0) + float(terms[k]) * len(labels)
        count += len(labels)
    return {k: v / count for k, v in sums.items()}
