"""Token selection and expert routing: the choices ActVAR makes, and computing only what they keep.

Both the generation path and the teacher-forcing path take their choices from the same
``torch.topk`` calls here, so the two paths agree token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


_WORKSPACE: dict[tuple, torch.Tensor] = {}


def workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat buffer. On the CPU a fresh multi-MB tensor costs page faults on first
    touch (measured: a 150 MB gather took 70 ms into a new tensor, 9 ms into a reused one)."""
    key = (name, dtype, device)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _WORKSPACE[key] = buf
    return buf[:numel]


def experts_forward(ffn, x_TC: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Sum of each token's chosen experts plus fc2's bias, computing only those experts.

    Expert ``e`` owns hidden neurons [e*d_e, (e+1)*d_e) of fc1/fc2 (``moefy`` permuted them so).
    Token-expert pairs are sorted by expert, each expert runs two GEMMs on its own tokens,
    and ``index_add_`` sums the results back per token. The fc2 bias is added once (paper
    eq. 4 writes it inside the sum: a typo, it would count the bias K_w times).
    """
    T, C = x_TC.shape
    K = experts_TK.shape[1]
    N = ffn.num_experts
    w1 = ffn.fc1.weight.view(N, -1, C)  # N, d_e, C
    b1 = ffn.fc1.bias.view(N, -1)  # N, d_e
    d_e = w1.shape[1]
    w2 = ffn.fc2.weight  # C, F  (expert e: columns e*d_e .. (e+1)*d_e)

    flat = experts_TK.reshape(-1)  # T*K
    order = flat.argsort(stable=True)  # slots grouped by expert
    counts = torch.bincount(flat, minlength=N).tolist()
    token_of_slot = order // K  # T*K: which token each sorted slot belongs to
    reuse = x_TC.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
    if reuse:
        x_sorted = workspace("x_sorted", T * K * C, x_TC.dtype, x_TC.device).view(T * K, C)
        torch.index_select(x_TC, 0, token_of_slot, out=x_sorted)
        y_sorted = workspace("y_sorted", T * K * C, x_TC.dtype, x_TC.device).view(T * K, C)
    else:
        x_sorted = x_TC.index_select(0, token_of_slot)
        y_sorted = None
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        h = F.gelu(F.linear(x_sorted[start : start + n], w1[e], b1[e]), approximate="tanh")  # n, d_e
        w2_e = w2[:, e * d_e : (e + 1) * d_e].t()  # d_e, C (a strided view, no copy)
        if reuse:
            torch.mm(h, w2_e, out=y_sorted[start : start + n])
        else:
            y = h @ w2_e  # dtype follows autocast
            if y_sorted is None:
                y_sorted = x_sorted.new_empty(x_sorted.shape, dtype=y.dtype)
            y_sorted[start : start + n] = y
        start += n
    out = torch.zeros(T, C, dtype=y_sorted.dtype, device=x_TC.device)
    out.index_add_(0, token_of_slot, y_sorted)
    return out + ffn.fc2.bias
