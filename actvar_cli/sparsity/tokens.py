"""Which tokens a block computes: the scores each token rule ranks by, and the top-k choice.

Both the generation path and the teacher-forcing path take their choices from the same
``torch.topk`` calls here, so the two paths agree token for token.
"""

from __future__ import annotations

import functools

import torch


def select_tokens(scores_Bn: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of each row's k best tokens, in sequence order."""
    return scores_Bn.topk(k, dim=-1).indices.sort(dim=-1).values


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries along the last dimension."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


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
