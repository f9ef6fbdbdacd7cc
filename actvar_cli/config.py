"""Model configurations, and how to read them off an official state dict.

Official ``.pth`` files hold no configuration, so every field here is inferred from key
names and tensor shapes, the way upstream's ``build_vae_var`` would have built them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

# Patch layouts (side length of each scale's token map). The total token count
# L = sum(pn**2) is what a state dict reveals (pos_1LC is (1, L, C)).
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # L = 680, 256x256 images
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # L = 2240, 512x512 images
PATCH_LAYOUTS: dict[int, tuple[int, ...]] = {
    sum(p * p for p in PATCH_NUMS_256): PATCH_NUMS_256,
    sum(p * p for p in PATCH_NUMS_512): PATCH_NUMS_512,
}
VAE_PATCH_SIZE = 16  # the VQVAE downsamples by 2**4: image side = patch_nums[-1] * 16


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
    patch_nums: tuple[int, ...] = PATCH_NUMS_256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

    def __post_init__(self) -> None:
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", round(4 * self.embed_dim))
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"width {self.embed_dim} is not divisible by {self.num_heads} heads",
                "pass --num-heads with a divisor of the width",
            )
        if self.num_experts and self.ffn_dim % self.num_experts:
            raise ConfigError(
                f"{self.num_experts} experts do not divide the FFN width {self.ffn_dim}",
                f"choose an expert count that divides {self.ffn_dim}, e.g. 16",
            )

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * VAE_PATCH_SIZE

    @property
    def expert_dim(self) -> int:
        return self.ffn_dim // self.num_experts if self.num_experts else self.ffn_dim

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


def arch_config(name: str) -> VARConfig:
    """``d16`` ... ``d36`` (official shapes) or ``tiny`` (the built-in toy model)."""
    from .tiny import TINY_VAR_CONFIG  # local import: tiny builds on this module

    key = name.lower().removeprefix("var_")
    if key == "tiny":
        return TINY_VAR_CONFIG
    if key.startswith("d") and key[1:].isdigit() and int(key[1:]) in OFFICIAL_DEPTHS:
        return official_var_config(int(key[1:]))
    raise ConfigError(
        f"unknown architecture {name!r}",
        "use one of " + ", ".join(f"d{d}" for d in OFFICIAL_DEPTHS) + " or tiny",
    )


# ---------------------------------------------------------------------------
# Inference from state dicts
# ---------------------------------------------------------------------------

VAR_MARKERS = ("pos_1LC", "class_emb.weight", "head.weight")
VAE_MARKERS = ("encoder.conv_in.weight", "quantize.embedding.weight")


def looks_like_var(keys: set[str]) -> bool:
    return all(k in keys for k in VAR_MARKERS)


def looks_like_vae(keys: set[str]) -> bool:
    return all(k in keys for k in VAE_MARKERS)


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def infer_var_config(
    sd: Mapping[str, Any],
    num_heads: int | None = None,
    patch_nums: tuple[int, ...] | None = None,
) -> VARConfig:
    """Read a VARConfig off a state dict (tensors or anything with ``.shape``)."""
    keys = set(sd)
    if not looks_like_var(keys):
        raise ConfigError("not a VAR state dict (no pos_1LC / class_emb / head)")
    depth = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    _, seq_len, width = _shape(sd, "pos_1LC")
    if patch_nums is None:
        if seq_len not in PATCH_LAYOUTS:
            raise ConfigError(
                f"unknown patch layout with {seq_len} tokens",
                "known layouts have 680 (256px) or 2240 (512px) tokens",
            )
        patch_nums = PATCH_LAYOUTS[seq_len]
    elif sum(p * p for p in patch_nums) != seq_len:
        raise ConfigError(f"patch layout {patch_nums} does not sum to {seq_len} tokens")
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in keys
    if attn_l2_norm:
        stored_heads = _shape(sd, "blocks.0.attn.scale_mul_1H11")[1]
        if num_heads is not None and num_heads != stored_heads:
            raise ConfigError(f"--num-heads {num_heads} contradicts the checkpoint, which has {stored_heads} heads")
        num_heads = stored_heads
    num_experts = _shape(sd, "blocks.0.ffn.router.weight")[0] if "blocks.0.ffn.router.weight" in keys else 0
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


@dataclass
class SparsityPolicy:
    """Where and how much ActVAR sparsity applies (paper section 4.1: last two scales, 75%).

    ``scales`` are 1-based scale numbers; ``token_rates[i]`` is the fraction of that scale's
    tokens each block processes, ``weight_rates[i]`` the fraction of experts each kept token uses.
    """

    scales: tuple[int, ...] = (9, 10)
    token_rates: tuple[float, ...] = (0.75, 0.75)
    weight_rates: tuple[float, ...] = (0.75, 0.75)

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        self.token_rates = tuple(float(r) for r in self.token_rates)
        self.weight_rates = tuple(float(r) for r in self.weight_rates)
        n = len(self.scales)
        if len(set(self.token_rates)) == 1 and len(self.token_rates) != n:  # a uniform rate fits any scales
            self.token_rates = self.token_rates[:1] * n
        if len(set(self.weight_rates)) == 1 and len(self.weight_rates) != n:
            self.weight_rates = self.weight_rates[:1] * n
        if not (len(self.scales) == len(self.token_rates) == len(self.weight_rates)):
            raise ConfigError(
                f"{len(self.scales)} sparse scales but {len(self.token_rates)} token rates "
                f"and {len(self.weight_rates)} weight rates",
                "give one rate, or one per scale (--token-rates 0.75,0.75)",
            )
        if len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"sparse scales {self.scales} repeat a scale")
        for r in self.token_rates + self.weight_rates:
            if not (0.0 < r <= 1.0):
                raise ConfigError(f"rate {r} is outside (0, 1]", "rates are fractions, e.g. 0.75")

    def validate_for(self, cfg: VARConfig) -> None:
        n = len(cfg.patch_nums)
        for s in self.scales:
            if not 1 <= s <= n:
                raise ConfigError(f"scale {s} does not exist", f"this model has scales 1..{n}")

    def index(self) -> dict[int, tuple[float, float]]:
        """0-based scale index -> (token rate, weight rate)."""
        return {s - 1: (t, w) for s, t, w in zip(self.scales, self.token_rates, self.weight_rates)}

    def tokens_kept(self, si: int, num_tokens: int) -> int:
        """K_t = ceil(rate * tokens) on a sparse scale, all tokens elsewhere."""
        rates = self.index()
        if si not in rates:
            return num_tokens
        return max(1, min(num_tokens, _ceil(rates[si][0] * num_tokens)))

    def experts_kept(self, si: int, num_experts: int) -> int:
        """K_w = round(rate * N) (at least 1) on a sparse scale, all experts elsewhere."""
        rates = self.index()
        if si not in rates or num_experts == 0:
            return num_experts
        return max(1, min(num_experts, round(rates[si][1] * num_experts)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "scales": list(self.scales),
            "token_rates": list(self.token_rates),
            "weight_rates": list(self.weight_rates),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SparsityPolicy:
        return cls(
            scales=tuple(d["scales"]),
            token_rates=tuple(d["token_rates"]),
            weight_rates=tuple(d["weight_rates"]),
        )

    @classmethod
    def dense(cls) -> SparsityPolicy:
        return cls(scales=(), token_rates=(), weight_rates=())

    def __str__(self) -> str:
        return json.dumps(self.to_dict())


def _ceil(x: float) -> int:
    # ceil that forgives float noise: 0.75 * 256 == 192.00000000000003 must give 192
    r = round(x)
    return r if abs(x - r) < 1e-9 else int(x) + (x > int(x))
