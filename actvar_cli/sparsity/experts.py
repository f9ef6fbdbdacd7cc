"""Which experts each token runs, and computing only those.

Expert work is a list of (token, expert) pairs sorted by expert; three kernels compute it and
give the same result:

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

from ..errors import ConfigError


def check_expert_count(ffn_dim: int, num_experts: int) -> None:
    """N equal experts need N >= 2 dividing the FFN width."""
    if num_experts < 2:
        raise ConfigError(f"--experts {num_experts}: need at least 2 experts")
    if ffn_dim % num_experts:
        divisors = [n for n in (2, 4, 8, 16, 32, 64) if ffn_dim % n == 0]
        raise ConfigError(
            f"{num_experts} experts do not divide the FFN width {ffn_dim}",
            f"use a divisor such as {', '.join(map(str, divisors))}",
        )


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


def route(router_logits_TN: torch.Tensor, k: int) -> torch.Tensor:
    """The k experts (T, k) each token uses: top-k of the router's softmax (= of its logits)."""
    return router_logits_TN.topk(k, dim=-1).indices


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
    d_e = ffn.fc1.out_features // ffn.num_experts  # not weight.shape: a quantized layer would dequantize
    macs_per_expert = num_pairs / ffn.num_experts * x_TC.shape[1] * d_e
    return "masked" if macs_per_expert < MASKED_BELOW_MACS_PER_EXPERT else "loop"


def chosen_from_topk(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, N) float: 1 where the token chose the expert."""
    return torch.zeros(experts_TK.shape[0], num_experts, device=experts_TK.device).scatter_(1, experts_TK, 1.0)


def chosen_from_pairs(pairs: Pairs, num_tokens: int, num_experts: int) -> torch.Tensor:
    """(T, N) float: 1 where a pair ran."""
    chosen = torch.zeros(num_tokens, num_experts, device=pairs.token.device)
    return chosen.index_put_((pairs.token, pairs.expert), chosen.new_ones(()))


def masked_experts(ffn, x_TC: torch.Tensor, chosen_TN: torch.Tensor) -> torch.Tensor:
    """Every expert's hidden units for every token, the unchosen ones zeroed before fc2."""
    T, N = x_TC.shape[0], ffn.num_experts
    h_TNd = F.gelu(F.linear(x_TC, ffn.fc1.weight, ffn.fc1.bias), approximate="tanh").view(T, N, -1)
    return F.linear((h_TNd * chosen_TN.to(h_TNd.dtype).unsqueeze(-1)).view(T, -1), ffn.fc2.weight, ffn.fc2.bias)


def _grouped(ffn, x_PC: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    N, C = ffn.num_experts, x_PC.shape[1]
    offs = pairs.counts.cumsum(0).to(torch.int32)
    dtype = torch.get_autocast_dtype(x_PC.device.type) if torch.is_autocast_enabled(x_PC.device.type) else x_PC.dtype
    b1 = ffn.fc1.bias.to(dtype).view(N, -1)[pairs.expert]  # P, d_e
    w1 = ffn.fc1.weight.to(dtype).view(N, -1, C).transpose(1, 2)  # N, C, d_e
    h = F.gelu(grouped_mm(x_PC.to(dtype), w1, offs) + b1, approximate="tanh")
    del w1  # a quantized fc1's float weight goes before fc2's is made
    w2 = ffn.fc2.weight.to(dtype).view(C, N, -1).permute(1, 2, 0)  # N, d_e, C
    return grouped_mm(h, w2, offs)


def _loop(ffn, x_TC: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    """Each expert gathers its own tokens, runs its two GEMMs and adds into the output in place.

    The CPU kernel: nothing of size pairs x C is ever made (at d16, batch 8, that would be 150 MB,
    and on a CPU fresh buffers that large cost more in page faults than the gathers themselves).
    """
    N, C = ffn.num_experts, x_TC.shape[1]
    w1 = ffn.fc1.weight.view(N, -1, C)  # N, d_e, C
    w2_CF = ffn.fc2.weight  # read once: a quantized layer dequantizes on each read
    b1 = ffn.fc1.bias.view(N, -1)
    d_e = w1.shape[1]
    out = None
    start = 0
    for e, n in enumerate(pairs.counts.tolist()):
        if n == 0:
            continue
        token_n = pairs.token[start : start + n]
        h = F.gelu(F.linear(x_TC.index_select(0, token_n), w1[e], b1[e]), approximate="tanh")  # n, d_e
        y_nC = h @ w2_CF[:, e * d_e : (e + 1) * d_e].t()  # dtype follows autocast
        if out is None:
            out = x_TC.new_zeros(x_TC.shape, dtype=y_nC.dtype)
        out.index_add_(0, token_n, y_nC)
        start += n
    return out if out is not None else x_TC.new_zeros(x_TC.shape)


# ---------------------------------------------------------------------------
# How close each expert comes to the whole FFN (router targets)
# ---------------------------------------------------------------------------


def _per_expert(ffn, h_TC: torch.Tensor, num_experts: int, reduce, chunk: int = 1024) -> torch.Tensor:
    """``reduce(experts_TNC)`` over chunks of tokens; experts_TNC is each expert's output without fc2's bias."""
    w1, b1 = ffn.fc1.weight.float(), ffn.fc1.bias.float()
    w2 = ffn.fc2.weight.float().view(w1.shape[1], num_experts, -1)  # C, N, d_e
    out = []
    for s in range(0, h_TC.shape[0], chunk):
        h = h_TC[s : s + chunk].to(w1.device)
        act = F.gelu(F.linear(h, w1, b1), approximate="tanh").view(h.shape[0], num_experts, -1)  # T, N, d_e
        out.append(reduce(torch.einsum("tnd,cnd->tnc", act, w2)).cpu())  # T, N, C -> T, N
    return torch.cat(out)


def expert_distances(ffn, h_TC: torch.Tensor, num_experts: int) -> torch.Tensor:
    """d[t, e] = mean squared distance between expert e's output (with fc2's bias) and the FFN output."""
    return _per_expert(ffn, h_TC, num_experts, lambda e: (e - e.sum(1, keepdim=True)).square().mean(-1))


def expert_norms(ffn, h_TC: torch.Tensor, num_experts: int) -> torch.Tensor:
    """n[t, e] = the L2 norm of expert e's output for token t (D2DMoE's routing target)."""
    return _per_expert(ffn, h_TC, num_experts, lambda e: e.norm(dim=-1))


def dropped_means(ffn, h_TC: torch.Tensor, chosen_TN: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N, C): each expert's mean output (without fc2's bias) over the tokens that do not choose it;
    zero for an expert every token chooses. The best constant to add in a dropped expert's place."""
    N = ffn.num_experts
    w1, b1 = ffn.fc1.weight.float(), ffn.fc1.bias.float()
    w2 = ffn.fc2.weight.float().view(w1.shape[1], N, -1)  # C, N, d_e
    sums = torch.zeros(N, w1.shape[1], device=w1.device)
    for s in range(0, h_TC.shape[0], chunk):
        h = h_TC[s : s + chunk].to(w1.device)
        dropped_TN = 1 - chosen_TN[s : s + chunk].to(w1.device)
        act = F.gelu(F.linear(h, w1, b1), approximate="tanh").view(h.shape[0], N, -1)  # T, N, d_e
        sums += torch.einsum("tn,tnd,cnd->nc", dropped_TN, act, w2)
    counts = (1 - chosen_TN).sum(0).to(sums.device)  # N
    return sums / counts.clamp_min(1).unsqueeze(1)
