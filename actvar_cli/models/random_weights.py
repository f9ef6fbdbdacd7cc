"""Seeded random weights for any architecture: benchmarks and dry runs without a download.

Timing does not depend on the weights, so ``bench --arch`` and ``random-weights`` use these.
Each tensor is scaled by its role so that every parameter matters and token distributions
are far from uniform (a peaked head, unit-scale embeddings).
"""

from __future__ import annotations

import math

import torch

from .config import VAEConfig, VARConfig
from .var import VAR
from .vqvae import VQVAE


def _std_for(name: str, shape: torch.Size) -> tuple[float, float]:
    """(mean, std) for one tensor, by its role."""
    fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) if len(shape) >= 2 else 1
    if name.endswith("scale_mul_1H11"):
        return math.log(4.0), 0.3
    if "norm" in name and name.endswith("weight"):  # GroupNorm gains
        return 1.0, 0.1
    if name.endswith("bias") or name.endswith("q_bias") or name.endswith("v_bias"):
        return 0.0, 0.05
    if name in ("pos_start", "pos_1LC", "lvl_embed.weight"):
        return 0.0, 0.5
    if name == "class_emb.weight":
        return 0.0, 1.0
    if name == "quantize.embedding.weight":
        return 0.0, 0.5
    if name == "head.weight":
        return 0.0, 3.0 / math.sqrt(fan_in)  # logits with a spread of ~3: peaked, not one-hot
    if "ada_lin" in name:
        return 0.0, 0.6 / math.sqrt(fan_in)
    return 0.0, 1.0 / math.sqrt(fan_in)


def random_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict for ``module`` with seeded random parameters (buffers kept as built)."""
    g = torch.Generator().manual_seed(seed)
    sd = module.state_dict()
    out = {}
    params = dict(module.named_parameters())
    for name in sorted(sd):
        if name in params:
            mean, std = _std_for(name, sd[name].shape)
            out[name] = torch.randn(sd[name].shape, generator=g).mul_(std).add_(mean)
        else:
            out[name] = sd[name].clone()
    return out


def random_var(cfg: VARConfig, seed: int = 0) -> VAR:
    """A VAR of ``cfg`` with seeded random weights (eval mode, no grad)."""
    with torch.device("meta"):
        model = VAR(cfg)
    model.load_state_dict(random_state_dict(VAR(cfg), seed), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def random_vae(cfg: VAEConfig, seed: int = 1) -> VQVAE:
    """A VQVAE of ``cfg`` with seeded random weights (eval mode, no grad)."""
    with torch.device("meta"):
        vae = VQVAE(cfg)
    vae.load_state_dict(random_state_dict(VQVAE(cfg), seed), strict=True, assign=True)
    return vae.eval().requires_grad_(False)
