"""Seeded random models in the official format: the built-in tiny model, and any official
architecture with random weights (for benchmarks and dry runs without a download).

The tiny model lets every command run at once, with no download and no GPU
(``actvar sample tiny``). Weights are deterministic (a fixed-seed CPU generator fills them
in name order) and scaled so that every parameter matters and the token distributions are
far from uniform, which gives distillation something real to recover.
"""

from __future__ import annotations

import functools
import math

import torch

from .config import PATCH_NUMS_256, VAEConfig, VARConfig

TINY_VAR_CONFIG = VARConfig(
    depth=4,
    embed_dim=128,
    num_heads=4,
    num_classes=1000,
    vocab_size=4096,
    vae_dim=32,
    patch_nums=PATCH_NUMS_256,
    shared_aln=False,
    attn_l2_norm=True,
)
TINY_VAE_CONFIG = VAEConfig(ch=32, vocab_size=4096, z_channels=32, patch_nums=PATCH_NUMS_256)
TINY_SEED = 20240611


def _std_for(name: str, shape: torch.Size) -> tuple[float, float]:
    """(mean, std) for one tensor of the tiny model, by its role."""
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


@functools.lru_cache(maxsize=1)
def _tiny_var_sd() -> dict[str, torch.Tensor]:
    from .model import VAR

    return random_state_dict(VAR(TINY_VAR_CONFIG), TINY_SEED)


@functools.lru_cache(maxsize=1)
def _tiny_vae_sd() -> dict[str, torch.Tensor]:
    from .vqvae import VQVAE

    return random_state_dict(VQVAE(TINY_VAE_CONFIG), TINY_SEED + 1)


def tiny_var_state_dict() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _tiny_var_sd().items()}


def tiny_vae_state_dict() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _tiny_vae_sd().items()}
