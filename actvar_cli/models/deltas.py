"""Sparse-scale deltas: what stage 2 trains, acting only where the model is sparse.

Stage 2 of the paper fine-tunes attention, experts and head at every scale, and so moves what the
model draws at scales the policy never touches (the pictures change). Here it trains low-rank
updates ``B @ A`` of the attention's ``mat_qkv`` and ``proj`` and of the ``head`` instead, and they
act only from the first sparse scale on: the scales before it compute exactly the teacher's function,
bit for bit, and their keys and values in the cache are the teacher's too. A ``ScaleSwitch`` shared
by the model's deltas says where they act: nowhere, on every row (a sparse step of generation), or
on the positions of a (L,) mask (teacher forcing, a whole pyramid at once).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ScaleSwitch:
    """Where the deltas act: None (nowhere), ``"all"``, or a (L,) float mask over positions."""

    def __init__(self) -> None:
        self.where: str | torch.Tensor | None = None

    def apply(self, y: torch.Tensor, x: torch.Tensor, delta: LowRankDelta | None) -> torch.Tensor:
        if delta is None or self.where is None:
            return y
        d = delta(x)
        if isinstance(self.where, str):
            return y + d
        return y + d * self.where.to(d.dtype).view(*([1] * (d.dim() - 2)), -1, 1)  # (..., L, out)


class LowRankDelta(nn.Module):
    """``x @ A.T @ B.T``: A (rank, in) random, B (out, rank) zero, so a new delta changes nothing."""

    def __init__(self, in_features: int, out_features: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B)
