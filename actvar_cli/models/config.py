"""Model configurations, and how to read them off an official state dict.

Official ``.pth`` files hold no configuration, so every field here is inferred from key
names and tensor shapes, the way upstream's ``build_vae_var`` would have built them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..sparsity.experts import check_expert_count

# Patch layouts (side length of each scale's token map). The total token count
# L = sum(pn**2) is what a state dict reveals (pos_1LC is (1, L, C)).
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # L = 680, 256x256 images
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # L = 2240, 512x512 images
PATCH_LAYOUTS: dict[int, tuple[int, ...]] = {
    sum(p * p for p in PATCH_NUMS_256): PATCH_NUMS_256,
    sum(p * p for p in PATCH_NUMS_512): PATCH_NUMS_512,
}
VAE_PATCH_SIZE = 16  # the official VQVAE downsamples by 2**4: image side = patch_nums[-1] * 16
REFERENCE_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)  # the built-in reference model: L = 155, 32x32 images


def _check_int(name: str, value: object, low: int, high: int = 1 << 24) -> None:
    """Sizes read from files are bounded: an impossible value is refused before anything is built."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} = {value!r} must be an integer from {low} to {high}")


@dataclass(frozen=True)
class VAEConfig:
    """The multi-scale residual VQVAE (upstream ``VQVAE``)."""

    ch: int = 160
    vocab_size: int = 4096
    z_channels: int = 32
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    share_quant_resi: int = 4  # number of phi convs shared across the scales
    quant_resi: float = 0.5  # phi(h) = (1 - r) * h + r * conv(h)
    norm_groups: int = 32  # GroupNorm groups (upstream: 32); not visible in a state dict, kept in metadata
    patch_nums: tuple[int, ...] = PATCH_NUMS_256

    def __post_init__(self) -> None:
        for name in ("ch", "vocab_size", "z_channels", "num_res_blocks", "share_quant_resi", "norm_groups"):
            _check_int(name, getattr(self, name), low=1)
        if not 1 <= len(self.ch_mult) <= 8 or not all(isinstance(m, int) and 0 < m <= 64 for m in self.ch_mult):
            raise ValueError(f"ch_mult {self.ch_mult!r} must be one to eight positive integers")
        if any((self.ch * m) % self.norm_groups for m in (1, *self.ch_mult)):
            raise ValueError(f"{self.norm_groups} GroupNorm groups do not divide the VQVAE's channels")
        if not (isinstance(self.quant_resi, (int, float)) and math.isfinite(self.quant_resi)):
            raise ValueError(f"quant_resi {self.quant_resi!r} must be a number")
        if not self.patch_nums or not all(isinstance(p, int) and 0 < p <= 4096 for p in self.patch_nums):
            raise ValueError(f"patch_nums {self.patch_nums!r} must be positive integers")

    @property
    def stride(self) -> int:
        """Pixels per token of the last scale: the encoder halves the size at all but its last level."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kw)


@dataclass(frozen=True)
class VARConfig:
    """The VAR transformer; ``num_experts > 0`` marks an ActVAR model (router + selector)."""

    depth: int
    embed_dim: int
    num_heads: int
    num_classes: int = 1000
    vocab_size: int = 4096
    vae_dim: int = 32  # Cvae: width of a VQVAE code vector
    ffn_dim: int = 0  # hidden width of each FFN; 0 means round(4 * embed_dim)
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    shared_aln: bool = False
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6
    num_experts: int = 0
    delta_rank: int = 0  # rank of the sparse-scale deltas stage 2 trains (models/deltas.py); 0: none
    expert_means: bool = False  # each FFN keeps its experts' mean outputs, added for dropped experts
    vae_stride: int = VAE_PATCH_SIZE  # pixels per last-scale token of the VQVAE it was trained with

    def __post_init__(self) -> None:
        for name in ("depth", "embed_dim", "num_heads", "num_classes", "vocab_size", "vae_dim", "vae_stride"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("ffn_dim", self.ffn_dim, low=0)
        _check_int("num_experts", self.num_experts, low=0)
        _check_int("delta_rank", self.delta_rank, low=0, high=4096)
        if not self.patch_nums or not all(isinstance(p, int) and 0 < p <= 4096 for p in self.patch_nums):
            raise ValueError(f"patch_nums {self.patch_nums!r} must be positive integers")
        if not (isinstance(self.norm_eps, (int, float)) and math.isfinite(self.norm_eps) and 0 < self.norm_eps < 1):
            raise ValueError(f"norm_eps {self.norm_eps!r} must lie in (0, 1)")
        if not all(isinstance(v, bool) for v in (self.shared_aln, self.attn_l2_norm, self.expert_means)):
            raise ValueError("shared_aln, attn_l2_norm and expert_means must be true or false")
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", round(4 * self.embed_dim))
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"width {self.embed_dim} is not divisible by {self.num_heads} heads",
                "pass --num-heads with a divisor of the width",
            )
        if self.num_experts:
            check_expert_count(self.ffn_dim, self.num_experts)

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.vae_stride

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VARConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "patch_nums" in kw:
            kw["patch_nums"] = tuple(kw["patch_nums"])
        return cls(**kw)

    def replace(self, **changes: Any) -> VARConfig:
        return dataclasses.replace(self, **changes)

    @property
    def dense(self) -> VARConfig:
        """The dense architecture an ActVAR model was made from: no experts, no deltas."""
        return self.replace(num_experts=0, delta_rank=0, expert_means=False)


REFERENCE_VAE_CONFIG = VAEConfig(
    ch=32,
    vocab_size=1024,
    z_channels=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    norm_groups=8,
    patch_nums=REFERENCE_PATCH_NUMS,
)
REFERENCE_VAR_CONFIG = VARConfig(
    depth=6,
    embed_dim=256,
    num_heads=4,
    num_classes=10,
    vocab_size=1024,
    vae_dim=32,
    patch_nums=REFERENCE_PATCH_NUMS,
    vae_stride=4,
)


BUILTIN_VAR_CONFIG = REFERENCE_VAR_CONFIG  # `tiny` is the reference model (actvar_cli/builtin.py)
BUILTIN_VAE_CONFIG = REFERENCE_VAE_CONFIG


def official_var_config(depth: int) -> VARConfig:
    """What upstream's ``build_vae_var`` builds: width 64*depth, heads = depth.

    The Hub's d36 is the 512px model with shared AdaLN.
    """
    big = depth == 36
    return VARConfig(
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        patch_nums=PATCH_NUMS_512 if big else PATCH_NUMS_256,
        shared_aln=big,
        attn_l2_norm=True,
    )


OFFICIAL_DEPTHS = (16, 20, 24, 30, 36)
BUILTIN_NAME = "tiny"  # the built-in reference model, usable wherever a checkpoint is expected


def arch_config(name: str) -> VARConfig:
    """``d16`` ... ``d36`` (the Hub's shapes), any other ``dN`` as upstream's ``build_vae_var``
    would build it (width 64N, N heads, 256px), or ``tiny`` (the built-in reference model)."""
    key = name.lower().removeprefix("var_")
    if key == BUILTIN_NAME:
        return BUILTIN_VAR_CONFIG
    if key.startswith("d") and key[1:].isdigit() and 1 <= int(key[1:]) <= 48:
        return official_var_config(int(key[1:]))
    raise ConfigError(
        f"unknown architecture {name!r}",
        "use dN (official: " + ", ".join(f"d{d}" for d in OFFICIAL_DEPTHS) + ") or tiny",
    )


# ---------------------------------------------------------------------------
# Inference from state dicts
# ---------------------------------------------------------------------------

BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")
VAR_MARKERS = ("pos_1LC", "class_emb.weight", "head.weight")
VAE_MARKERS = ("encoder.conv_in.weight", "quantize.embedding.weight")


def looks_like_var(keys: set[str]) -> bool:
    return all(k in keys for k in VAR_MARKERS)


def looks_like_vae(keys: set[str]) -> bool:
    return all(k in keys for k in VAE_MARKERS)


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def infer_patch_nums(sd: Mapping[str, Any], seq_len: int) -> tuple[int, ...]:
    """The patch layout: from the ``lvl_1L`` buffer (each scale's token count) when the state
    dict holds it, else the known layout with ``seq_len`` tokens and as many scales."""
    levels = _shape(sd, "lvl_embed.weight")[0]
    lvl = sd.get("lvl_1L")
    if isinstance(lvl, torch.Tensor) and not lvl.is_meta and lvl.numel() == seq_len:
        counts = torch.bincount(lvl.reshape(-1).long(), minlength=levels).tolist()
        sides = [round(c**0.5) for c in counts]
        if all(s * s == c and s > 0 for s, c in zip(sides, counts)):
            return tuple(sides)
    known = PATCH_LAYOUTS.get(seq_len)
    if known is not None and len(known) == levels:
        return known
    raise ConfigError(
        f"unknown patch layout ({seq_len} tokens over {levels} scales) and no lvl_1L buffer to read it from",
        "give a .safetensors written by actvar (it stores its configuration)",
    )


def _block_count(keys: set[str]) -> int:
    """The number of blocks: their indices must run 0..D-1 (a key ``blocks.999999999.x`` alone is refused)."""
    block_keys = [k for k in keys if k.startswith("blocks.")]
    if any(not BLOCK_KEY.match(k) for k in block_keys):
        raise ValueError("a block key is not blocks.<number>.<name>")
    found = {int(BLOCK_KEY.match(k).group(1)) for k in block_keys}
    if not found or found != set(range(len(found))):
        shown = sorted(found)[:3] + (["…"] if len(found) > 3 else [])
        raise ValueError(f"its blocks are numbered {shown}, not 0..N-1")
    return len(found)


def infer_var_config(
    sd: Mapping[str, Any],
    num_heads: int | None = None,
    patch_nums: tuple[int, ...] | None = None,
) -> VARConfig:
    """Read a VARConfig off a state dict (tensors or anything with ``.shape``)."""
    keys = set(sd)
    if not looks_like_var(keys):
        raise ConfigError("not a VAR state dict (no pos_1LC / class_emb / head)")
    depth = _block_count(keys)
    _, seq_len, width = _shape(sd, "pos_1LC")
    if patch_nums is None:
        patch_nums = infer_patch_nums(sd, seq_len)
    elif sum(p * p for p in patch_nums) != seq_len:
        raise ConfigError(f"patch layout {patch_nums} does not sum to {seq_len} tokens")
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in keys
    if attn_l2_norm:
        stored_heads = _shape(sd, "blocks.0.attn.scale_mul_1H11")[1]
        if num_heads is not None and num_heads != stored_heads:
            raise ConfigError(f"--num-heads {num_heads} contradicts the checkpoint, which has {stored_heads} heads")
        num_heads = stored_heads
    num_experts = _shape(sd, "blocks.0.ffn.router.weight")[0] if "blocks.0.ffn.router.weight" in keys else 0
    delta_rank = _shape(sd, "delta_head.A")[0] if "delta_head.A" in keys else 0
    return VARConfig(
        depth=depth,
        embed_dim=width,
        num_heads=num_heads if num_heads is not None else depth,
        num_classes=_shape(sd, "class_emb.weight")[0] - 1,
        vocab_size=_shape(sd, "head.weight")[0],
        vae_dim=_shape(sd, "word_embed.weight")[1],
        ffn_dim=_shape(sd, "blocks.0.ffn.fc1.weight")[0],
        patch_nums=tuple(patch_nums),
        shared_aln="shared_ada_lin.1.weight" in keys,
        attn_l2_norm=attn_l2_norm,
        num_experts=num_experts,
        delta_rank=delta_rank,
        expert_means="blocks.0.ffn.dropped_mean" in keys,
    )


def infer_vae_config(sd: Mapping[str, Any], patch_nums: tuple[int, ...] = PATCH_NUMS_256) -> VAEConfig:
    """Read a VAEConfig off a VQVAE state dict; the patch layout comes from the VAR it serves."""
    keys = set(sd)
    if not looks_like_vae(keys):
        raise ConfigError("not a VQVAE state dict (no encoder.conv_in / quantize.embedding)")
    ch = _shape(sd, "encoder.conv_in.weight")[0]
    levels = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("encoder.down."))
    ch_mult = tuple(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
    num_res = 1 + max(int(k.split(".")[4]) for k in keys if k.startswith("encoder.down.0.block."))
    vocab, z = _shape(sd, "quantize.embedding.weight")
    share = sum(1 for k in keys if k.startswith("quantize.quant_resi.qresi_ls.") and k.endswith(".weight"))
    if share == 0:
        raise ConfigError("unsupported VQVAE: only partially shared phi convs (qresi_ls) are supported")
    return VAEConfig(
        ch=ch,
        vocab_size=vocab,
        z_channels=z,
        ch_mult=ch_mult,
        num_res_blocks=num_res,
        share_quant_resi=share,
        patch_nums=tuple(patch_nums),
    )
