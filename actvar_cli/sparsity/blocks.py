"""How a block computes a sparse scale: ActVAR, and every other method a policy describes.

Generation (``block_generate``): the tokens a block keeps are gathered into a compact
(B, K_t, C) tensor, attention and the FFN (dense, or only the chosen experts) run on them,
and they are scattered back. Skipped tokens pass through unchanged (paper eq. 9), receive the
block's update of the previous scale, resized (``skipped_update``), or, with FastVAR's rule,
the previous scale's output of each sublayer. Only kept tokens
enter the block's KV cache: a skipped token is not a query and not a key of that block.

Teacher forcing (``block_masked``): the whole sequence at once, with the same choices
expressed as an attention mask that hides skipped tokens as keys and as straight-through
gates whose forward value is the hard 0/1 choice, so that training computes what
generation computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..components import component
from . import experts as routing
from . import tokens
from .policy import ScalePlan


@dataclass
class GenerationState:
    """What one generation remembers across blocks and scales."""

    kernel: str = "auto"  # expert kernel: auto, grouped, loop or masked (routing.KERNELS)
    record_sublayers: bool = False  # FastVAR: keep each block's sublayer outputs for the next scale
    count_pairs: bool = False  # keep the number of (token, expert) pairs each scale ran (reads the host)
    fixed_scores: torch.Tensor | None = None  # (B, h, w): block 0's selector scores at the first sparse scale
    fixed_idx: torch.Tensor | None = None  # (B, K_t) positions kept at scale ``fixed_scale``
    fixed_scale: int = -1
    sublayers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # block -> (attn, ffn)
    updates: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> (B, n, C) output - input, last scale
    pairs_run: dict[int, int] = field(default_factory=dict)  # scale -> (token, expert) pairs

    def keep_rows(self, rows: int) -> None:
        """Guidance turned off: only the first ``rows`` (the conditional ones) go on."""
        self.sublayers = {i: (a[:rows], f[:rows]) for i, (a, f) in self.sublayers.items()}
        self.updates = {i: u[:rows] for i, u in self.updates.items()}
        if self.fixed_scores is not None:
            self.fixed_scores = self.fixed_scores[:rows]
        if self.fixed_idx is not None:
            self.fixed_idx = self.fixed_idx[:rows]


def gather(x_BnC: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
    return x_BnC.gather(1, idx_BK.unsqueeze(-1).expand(-1, -1, x_BnC.shape[-1]))


def scatter(x_BnC: torch.Tensor, idx_BK: torch.Tensor, values_BKC: torch.Tensor) -> torch.Tensor:
    return x_BnC.scatter(1, idx_BK.unsqueeze(-1).expand(-1, -1, x_BnC.shape[-1]), values_BKC)


def kept_tokens(block, x_BnC: torch.Tensor, plan: ScalePlan, state: GenerationState, si: int):
    """(B, K_t) positions the block computes, in sequence order; None when it computes all."""
    if not plan.sparse_tokens:
        return None
    B, n, _ = x_BnC.shape
    if plan.token_rule == "selector":
        return tokens.select_tokens(block.selector_logits(x_BnC), plan.keep_tokens)
    if plan.token_rule == "centre":
        side = round(n**0.5)
        idx = tokens.select_tokens(tokens.centre_scores(side).to(x_BnC.device).view(1, n), plan.keep_tokens)
        return idx.expand(B, -1)
    if state.fixed_scale != si:  # "fixed": ranked once, by the first block that meets the first sparse scale
        side = round(n**0.5)
        if state.fixed_scores is None:
            state.fixed_scores = block.selector_logits(x_BnC).float().view(B, side, side)
            scores = state.fixed_scores.view(B, n)
        else:
            scores = F.interpolate(state.fixed_scores.unsqueeze(1), size=(side, side), mode="bilinear").view(B, n)
        state.fixed_idx, state.fixed_scale = tokens.select_tokens(scores, plan.keep_tokens), si
    return state.fixed_idx


def ffn_apply(ffn, h_BnC: torch.Tensor, plan: ScalePlan, state: GenerationState, si: int) -> torch.Tensor:
    """The FFN on kept tokens: dense, the router's top-K_w experts, or the thresholded ones."""
    if not plan.sparse_experts(ffn.num_experts):
        return ffn(h_BnC)
    with component("ffn"):
        return _experts(ffn, h_BnC, plan, state, si)


def _experts(ffn, h_BnC: torch.Tensor, plan: ScalePlan, state: GenerationState, si: int) -> torch.Tensor:
    h_TC = h_BnC.reshape(-1, h_BnC.shape[-1])
    experts_TK, pairs = None, None
    if plan.threshold is not None:
        pairs = routing.threshold_pairs(ffn.router_logits(h_TC), plan.threshold)
    else:
        experts_TK = routing.route(ffn.router_logits(h_TC), plan.keep_experts)  # T, K_w
    num_pairs = experts_TK.numel() if pairs is None else pairs.token.numel()
    if state.count_pairs:
        state.pairs_run[si] = state.pairs_run.get(si, 0) + int(num_pairs)
    kernel = routing.pick_kernel(state.kernel, ffn, h_TC, num_pairs)
    if pairs is None and kernel == "masked":  # no pair list needed
        chosen_TN = routing.chosen_from_topk(experts_TK, ffn.num_experts)
        y_TC = routing.masked_experts(ffn, h_TC, chosen_TN)
    else:
        pairs = pairs if pairs is not None else routing.topk_pairs(experts_TK, ffn.num_experts)
        y_TC = routing.experts_forward(ffn, h_TC, pairs, kernel)
        chosen_TN = (
            routing.chosen_from_pairs(pairs, h_TC.shape[0], ffn.num_experts) if ffn.dropped_mean is not None else None
        )
    if ffn.dropped_mean is not None:
        y_TC = y_TC + ffn.dropped_output(chosen_TN)
    return y_TC.view_as(h_BnC)


def block_generate(block, x_BnC, cond, cache, *, plan: ScalePlan, state: GenerationState, index: int, scale: int):
    """Block ``index`` at (0-based) scale ``scale`` of generation, computing only what ``plan`` keeps."""
    i, si = index, scale
    if plan.token_rule == "far-from-mean" and plan.sparse_tokens:
        return _fastvar_block(block, x_BnC, cond, cache, plan=plan, state=state, index=i, scale=si)
    mod = block.modulation(cond)
    with component("select"):
        idx = kept_tokens(block, x_BnC, plan, state, si)
        xs = x_BnC if idx is None else gather(x_BnC, idx)  # B, K_t, C
    if idx is not None and plan.skipped_kv:  # skipped tokens are keys (and stay in the cache), not queries
        attn_out = block.attn_branch(x_BnC, mod, cache=cache, query_idx_BK=idx)
    else:
        attn_out = block.attn_branch(xs, mod, cache=cache)
    xs = xs + attn_out
    ffn_out = block.ffn_branch(xs, mod, ffn=lambda h: ffn_apply(block.ffn, h, plan, state, si))
    if state.record_sublayers and idx is None:
        state.sublayers[i] = (attn_out, ffn_out)
    xs = xs + ffn_out
    if idx is None:
        out = xs
    else:
        with component("select"):
            base = x_BnC + _resized(state.updates[i], x_BnC.shape[1]).to(x_BnC.dtype) if plan.skipped_update else x_BnC
            out = scatter(base, idx, xs)
    if plan.record_update:
        state.updates[i] = out - x_BnC
    return out


def _resized(prev_BmC: torch.Tensor, n: int) -> torch.Tensor:
    """The previous scale's (B, m, C) map resized to this scale's n tokens (FastVAR: area)."""
    B, m, C = prev_BmC.shape
    side, prev_side = round(n**0.5), round(m**0.5)
    grid = prev_BmC.transpose(1, 2).reshape(B, C, prev_side, prev_side)
    return F.interpolate(grid, size=(side, side), mode="area").reshape(B, C, n).transpose(1, 2)


def _fastvar_block(block, x_BnC, cond, cache, *, plan: ScalePlan, state: GenerationState, index: int, scale: int):
    """FastVAR's cached token pruning: each sublayer computes the K_t tokens farthest from the
    scale's mean; the others receive the previous scale's output of that sublayer, resized."""
    i, si = index, scale
    mod = block.modulation(cond)
    n, K = x_BnC.shape[1], plan.keep_tokens
    prev_attn, prev_ffn = state.sublayers[i]
    idx = tokens.select_tokens(tokens.far_from_mean_scores(x_BnC), K)
    attn_out = block.attn_branch(gather(x_BnC, idx), mod, cache=cache)
    attn_full = scatter(_resized(prev_attn, n).to(attn_out.dtype), idx, attn_out)
    x = x_BnC + attn_full
    idx = tokens.select_tokens(tokens.far_from_mean_scores(x), K)
    ffn_out = block.ffn_branch(gather(x, idx), mod, ffn=lambda h: ffn_apply(block.ffn, h, plan, state, si))
    ffn_full = scatter(_resized(prev_ffn, n).to(ffn_out.dtype), idx, ffn_out)
    state.sublayers[i] = (attn_full, ffn_full)
    return x + ffn_full


# ---------------------------------------------------------------------------
# Teacher forcing
# ---------------------------------------------------------------------------


@dataclass
class BlockAux:
    """What a masked (teacher-forcing) block pass exposes for distillation, per sparse scale."""

    selector_logits: list[torch.Tensor] = field(default_factory=list)  # (B, n) per scale
    token_keep: list[torch.Tensor] = field(default_factory=list)  # (B, n) bool
    router_logits: list[torch.Tensor] = field(default_factory=list)  # (B, n, N)
    expert_keep: list[torch.Tensor] = field(default_factory=list)  # (B, n, N) bool
    ffn_input: list[torch.Tensor] = field(default_factory=list)  # (B, n, C), detached
    block_input: torch.Tensor | None = None  # (B, L, C)


@dataclass(frozen=True)
class TokenChoice:
    """One sparse scale's token choice, decided before the blocks run (fixed and centre rules)."""

    keep: torch.Tensor  # (B, n) bool
    gate: torch.Tensor  # (B, n): straight-through 0/1 (with block 0's selector gradient for "fixed")
    logits: torch.Tensor | None = None  # (B, n) the scores it was ranked by (the fixed rule's selector)


def fixed_choices(model, x: torch.Tensor, segments, rule: str) -> list[TokenChoice | None]:
    """Per segment, the positions every block keeps: ranked once (block 0's selector at the first
    sparse scale, upsampled to later ones) or by distance to the centre."""
    out: list[TokenChoice | None] = []
    first = None
    for seg in segments:
        if seg.keep_tokens >= seg.length:
            out.append(None)
            continue
        side = round(seg.length**0.5)
        if rule == "centre":
            scores = tokens.centre_scores(side).to(x.device, torch.float32).view(1, -1).expand(x.shape[0], -1)
            keep = tokens.topk_mask(scores, seg.keep_tokens)
            out.append(TokenChoice(keep, keep.to(x.dtype)))
            continue
        if first is None:
            first = model.blocks[0].selector_logits(x[:, seg.start : seg.end]).view(-1, side, side)
        logits = F.interpolate(first.unsqueeze(1), size=(side, side), mode="bilinear").view(x.shape[0], -1)
        keep = tokens.topk_mask(logits, seg.keep_tokens)
        out.append(TokenChoice(keep, tokens.straight_through(keep, torch.sigmoid(logits)), logits))
    return out


def _token_gates(block, x, segments, choices, aux):
    """(B, L) straight-through gates (None when no token is skipped) and (B, L) key mask."""
    B, L, _ = x.shape
    gate = None
    key_keep = torch.ones(B, L, dtype=torch.bool, device=x.device)
    for k, seg in enumerate(segments):
        if seg.keep_tokens >= seg.length:
            continue
        if choices is not None:
            keep, g = choices[k].keep, choices[k].gate
        else:
            logits = block.selector_logits(x[:, seg.start : seg.end])  # B, n
            keep = tokens.topk_mask(logits, seg.keep_tokens)
            g = tokens.straight_through(keep, torch.sigmoid(logits))
            if aux is not None:
                aux.selector_logits.append(logits)
                aux.token_keep.append(keep)
        key_keep[:, seg.start : seg.end] = keep
        gate = x.new_ones(B, L) if gate is None else gate
        gate = torch.cat((gate[:, : seg.start], g.to(gate.dtype), gate[:, seg.end :]), dim=1)
    return gate, key_keep


def _expert_gates(ffn, h, segments, hidden, aux):
    """(B, L, N) straight-through gates over experts, None when every expert runs."""
    B, L, _ = h.shape
    gate = None
    for seg in segments:
        if seg.keep_experts >= ffn.num_experts:
            continue
        h_seg = h[:, seg.start : seg.end]
        logits = ffn.router_logits(h_seg)  # B, n, N
        keep = tokens.topk_mask(logits, seg.keep_experts)
        g = tokens.straight_through(keep, logits.softmax(-1))
        gate = hidden.new_ones(B, L, ffn.num_experts) if gate is None else gate
        gate = torch.cat((gate[:, : seg.start], g, gate[:, seg.end :]), dim=1)
        if aux is not None:
            aux.router_logits.append(logits)
            aux.expert_keep.append(keep)
            aux.ffn_input.append(h_seg.detach())
    return gate


def block_masked(block, x, cond, causal_mask, segments, *, aux: BlockAux | None = None, choices=None, policy=None):
    """The whole sequence with the generation path's choices expressed as masks.

    ``causal_mask`` (1, 1, L, L) bool is VAR's block-causal mask (True = may attend); ``choices``
    are the precomputed token choices of the fixed and centre rules (None: this block's selector).
    """
    skipped_kv = policy is not None and policy.skipped_kv
    mod = block.modulation(cond)
    token_gate, key_keep = _token_gates(block, x, segments, choices, aux)
    hide_skipped = token_gate is not None and not skipped_kv
    mask = causal_mask & key_keep[:, None, None, :] if hide_skipped else causal_mask
    y = x + block.attn_branch(x, mod, mask)
    y = y + block.ffn_branch(y, mod, ffn=lambda h: _gated_ffn(block.ffn, h, segments, aux))
    if token_gate is None:
        return y
    y = x + token_gate.unsqueeze(-1) * (y - x)
    return _fill_skipped(y, x, segments, token_gate) if policy is not None and policy.skipped_update else y


def _fill_skipped(y_BLC, x_BLC, segments, gate_BL) -> torch.Tensor:
    """Skipped tokens receive the block's update of the previous scale, resized, as generation
    gives it (``skipped_update``); scale by scale, so that a sparse scale's filled update feeds the next."""
    for seg in segments:
        if seg.keep_tokens >= seg.length:
            continue
        prev_BmC = y_BLC[:, seg.prev_start : seg.start] - x_BLC[:, seg.prev_start : seg.start]
        skipped_Bn1 = (1 - gate_BL[:, seg.start : seg.end]).unsqueeze(-1)  # straight-through: 1 where skipped
        piece = y_BLC[:, seg.start : seg.end] + skipped_Bn1 * _resized(prev_BmC, seg.length)
        y_BLC = torch.cat((y_BLC[:, : seg.start], piece, y_BLC[:, seg.end :]), dim=1)
    return y_BLC


def _gated_ffn(ffn, h_BLC: torch.Tensor, segments, aux: BlockAux | None) -> torch.Tensor:
    """The FFN with each token's unchosen experts gated off (straight-through gates)."""
    B, L, _ = h_BLC.shape
    hidden = ffn.act(ffn.fc1(h_BLC))  # B, L, F
    expert_gate = _expert_gates(ffn, h_BLC, segments, hidden, aux)
    if expert_gate is None:
        return ffn.fc2(hidden)
    N = ffn.num_experts
    hidden = (hidden.view(B, L, N, -1) * expert_gate.unsqueeze(-1)).view(B, L, -1)  # B,L,N,d_e -> B,L,F
    return ffn.fc2(hidden) + ffn.dropped_output(expert_gate)  # 1 - gate: 1 where an expert is dropped
