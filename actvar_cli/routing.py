"""Which tokens and experts run, and computing only those.

Both the generation path and the teacher-forcing path take their choices from the same
``torch.topk`` calls here, so the two paths agree token for token. Expert work is a list of
(token, expert) pairs sorted by expert; two kernels compute it and give the same result:

* ``grouped``: one ``torch.nn.functional.grouped_mm`` per layer, group offsets from a
  ``scatter_add``/``cumsum`` of the pair counts. No host sync and no Python loop over
  experts: CUDA's grouped GEMM, and what ``torch.compile(fullgraph=True)`` and CUDA graphs
  need (its compiled form wants bf16, as CUDA runs it);
* ``loop``: one pair of GEMMs per expert, sizes read on the host; on a CPU this is often the
  faster of the two (docs/benchmarks.md);
* ``masked``: every hidden unit for every token, the unchosen experts' units zeroed before fc2.
  The same sum in two GEMMs, but not fewer FLOPs: ``auto`` takes it on a CPU only where each
  expert would get so few rows that the loop's per-expert cost exceeds the work it saves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

KERNELS = ("auto", "grouped", "loop", "masked")
# Below this many multiply-adds per expert (rows x C x d_e) the loop loses to the masked kernel on a
# CPU (each sparse scale's step timed in whole generations on 2 cores: docs/benchmarks.md, "The expert
# kernel on a CPU").
MASKED_BELOW_MACS_PER_EXPERT = 8_000_000


def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """torch.utils.flop_counter does not count grouped GEMMs: 2 * rows * K * N for (rows, K) x (G, K, N)."""
    rows, k = a_shape[-2], a_shape[-1]
    return 2 * rows * k * b_shape[-1] * (a_shape[0] if len(a_shape) == 3 else 1)


if torch.ops.aten._grouped_mm.default not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)


@torch.library.custom_op("actvar::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm(a, b, offs=offs)`` as one opaque op: torch.compile traces it in any dtype
    (the built-in one traces only in bf16/fp16), so a whole step compiles in float32 on a CPU too."""
    return F.grouped_mm(a, b, offs=offs)


@grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


flop_counter.register_flop_formula(torch.ops.actvar.grouped_mm)(_grouped_mm_flops)  # the counter sees only our op


@dataclass(frozen=True)
class SparseSegment:
    """A sparse scale as a slice of the token sequence, with how much of it is kept."""

    scale_index: int  # 0-based
    start: int
    end: int
    keep_tokens: int  # K_t
    keep_experts: int  # K_w

    @property
    def length(self) -> int:
        return self.end - self.start


def select_tokens(scores_Bn: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of each row's k best tokens, in sequence order."""
    return scores_Bn.topk(k, dim=-1).indices.sort(dim=-1).values


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries along the last dimension."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def route(router_logits_TN: torch.Tensor, k: int) -> torch.Tensor:
    """The k experts (T, k) each token uses: top-k of the router's softmax (= of its logits)."""
    return router_logits_TN.topk(k, dim=-1).indices


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward value exactly ``hard`` (0/1); gradient that of ``soft``.

    ``soft - soft.detach()`` is exactly 0 in floating point, so ``hard + 0`` stays exact.
    """
    return hard.to(soft.dtype) + (soft - soft.detach())


def far_from_mean_scores(x_BnC: torch.Tensor) -> torch.Tensor:
    """FastVAR's score (B, n): squared distance of each token to the mean token of its scale."""
    return (x_BnC - x_BnC.mean(dim=1, keepdim=True)).float().square().sum(-1)


@functools.lru_cache(maxsize=32)
def centre_scores(side: int) -> torch.Tensor:
    """EAR's centre-outward priority (side*side,): higher nearer the centre, ties in raster order."""
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    c = (side - 1) / 2
    dist = ((yy - c) ** 2 + (xx - c) ** 2).reshape(-1).double()
    return -(dist + torch.arange(side * side, dtype=torch.double) * 1e-6)  # nearer first, then earlier


# ---------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pairs:
    """(token, expert) pairs sorted by expert; ``counts[e]`` pairs of expert e (stays on the device)."""

    token: torch.Tensor  # P
    expert: torch.Tensor  # P
    counts: torch.Tensor  # N


def topk_pairs(experts_TK: torch.Tensor, num_experts: int) -> Pairs:
    """Every token with each of its K chosen experts; no host sync."""
    K = experts_TK.shape[1]
    flat = experts_TK.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return Pairs(order // K, flat[order], counts)


def threshold_pairs(norms_TN: torch.Tensor, tau: float) -> Pairs:
    """D2DMoE's dynamic-k rule: expert e runs for a token when its predicted output norm is at
    least ``tau`` times the token's largest. The pair count varies, so it is read on the host."""
    norms_TN = norms_TN.clamp_min(0)  # a linear predictor can undershoot; a norm is never negative
    active = norms_TN >= tau * norms_TN.max(dim=-1, keepdim=True).values
    expert, token = active.t().nonzero(as_tuple=True)  # expert-major: already sorted by expert
    counts = active.sum(0)
    return Pairs(token, expert, counts)


def experts_forward(ffn, x_TC: torch.Tensor, pairs: Pairs, kernel: str = "auto") -> torch.Tensor:
    """Sum over each token's pairs of its expert's output, plus fc2's bias.

    Expert ``e`` owns hidden neurons [e*d_e, (e+1)*d_e) of fc1/fc2 (``moefy`` permuted them so).
    The fc2 bias is added once (paper eq. 4 writes it inside the sum: a typo, it would count
    the bias K_w times).
    """
    kernel = pick_kernel(kernel, ffn, x_TC, pairs.token.shape[0])
    if kernel == "loop":
        return _loop(ffn, x_TC, pairs) + ffn.fc2.bias
    if kernel == "masked":
        chosen_TN = x_TC.new_zeros(x_TC.shape[0], ffn.num_experts).index_put_(
            (pairs.token, pairs.expert), x_TC.new_ones(())
        )
        return masked_experts(ffn, x_TC, chosen_TN)
    x_sorted = x_TC.index_select(0, pairs.token)  # P, C
    y_sorted = _grouped(ffn, x_sorted, pairs)  # P, C
    out = torch.zeros(x_TC.shape[0], y_sorted.shape[1], dtype=y_sorted.dtype, device=x_TC.device)
    return out.index_add_(0, pairs.token, y_sorted) + ffn.fc2.bias


def pick_kernel(kernel: str, ffn, x_TC: torch.Tensor, num_pairs: int) -> str:
    """``auto``: grouped off the CPU; on it, masked below a few multiply-adds per expert, else
    the loop. Shapes only, so no host sync."""
    if kernel != "auto":
        return kernel
    if x_TC.device.type != "cpu":
        return "grouped"
    d_e = ffn.fc1.weight.shape[0] // ffn.num_experts
    macs_per_expert = num_pairs / ffn.num_experts * x_TC.shape[1] * d_e
    return "masked" if macs_per_expert < MASKED_BELOW_MACS_PER_EXPERT else "loop"


def chosen_from_topk(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, N) float: 1 where the token chose the expert."""
    return torch.zeros(experts_TK.shape[0], num_experts, device=experts_TK.device).scatter_(1, experts_TK, 1.0)


def masked_experts(ffn, x_TC: torch.Tensor, chosen_TN: torch.Tensor) -> torch.Tensor:
    """Every expert's hidden units for every token, the unchosen ones zeroed before fc2."""
    T, N = x_TC.shape[0], ffn.num_experts
    h_TNd = F.gelu(F.linear(x_TC, ffn.fc1.weight, ffn.fc1.bias), approximate="tanh").view(T, N, -1)
    return F.linear((h_TNd * chosen_TN.to(h_TNd.dtype).unsqueeze(-1)).view(T, -1), ffn.fc2.weight, ffn.fc2.bias)


def _grouped(ffn, x_PC: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    N, C = ffn.num_experts, x_PC.shape[1]
    offs = pairs.counts.cumsum(0).to(torch.int32)
    dtype = torch.get_autocast_dtype(x_PC.device.type) if torch.is_autocast_enabled(x_PC.device.type) else x_PC.dtype
    w1 = ffn.fc1.weight.to(dtype).view(N, -1, C).transpose(1, 2)  # N, C, d_e
    w2 = ffn.fc2.weight.to(dtype).view(C, N, -1).permute(1, 2, 0)  # N, d_e, C
    b1 = ffn.fc1.bias.to(dtype).view(N, -1)[pairs.expert]  # P, d_e
    h = F.gelu(grouped_mm(x_PC.to(dtype), w1, offs) + b1, approximate="tanh")
    return grouped_mm(h, w2, offs)


def _loop(ffn, x_TC: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    """Each expert gathers its own tokens, runs its two GEMMs and adds into the output in place.

    The CPU kernel: nothing of size pairs x C is ever made (at d16, batch 8, that would be 150 MB,
    and on a CPU fresh buffers that large cost more in page faults than the gathers themselves).
    """
    N, C = ffn.num_experts, x_TC.shape[1]
    w1 = ffn.fc1.weight.view(N, -1, C)  # N, d_e, C
    b1 = ffn.fc1.bias.view(N, -1)
    d_e = w1.shape[1]
    out = None
    start = 0
    for e, n in enumerate(pairs.counts.tolist()):
        if n == 0:
            continue
        token_n = pairs.token[start : start + n]
        h = F.gelu(F.linear(x_TC.index_select(0, token_n), w1[e], b1[e]), approximate="tanh")  # n, d_e
        y_nC = h @ ffn.fc2.weight[:, e * d_e : (e + 1) * d_e].t()  # dtype follows autocast
        if out is None:
            out = x_TC.new_zeros(x_TC.shape, dtype=y_nC.dtype)
        out.index_add_(0, token_n, y_nC)
        start += n
    return out if out is not None else x_TC.new_zeros(x_TC.shape)
