"""Analytic FLOPs of generation, per scale and per component, for dense VAR and ActVAR.

Counts are of multiply-adds times two (what ``torch.utils.flop_counter`` reports), for one
image generated with classifier-free guidance (two transformer rows: conditional and
unconditional), over everything the generation loop runs: embeddings, AdaLN, attention
projections, attention over the KV cache, FFN / experts, router and selector, the head,
and the VQVAE's phi convs that build the next scale's input. The final VAE decode is not
part of generation and is not counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .policy import ScalePlan, SparsityPolicy

if TYPE_CHECKING:  # the configuration is read, never built, here
    from ..models.config import VARConfig

COMPONENTS = ("embed", "adaln", "qkv", "attention", "proj", "ffn", "router", "selector", "head", "vae_phi", "deltas")


@dataclass
class ScaleFlops:
    scale: int  # 1-based
    tokens: int
    kept_tokens: int
    kept_experts: float  # per kept token (a mean for the threshold rule)
    dense: dict[str, float] = field(default_factory=dict)
    sparse: dict[str, float] = field(default_factory=dict)


@dataclass
class FlopsReport:
    arch: dict[str, Any]
    policy: dict[str, Any]
    num_experts: int
    scales: list[ScaleFlops]

    @property
    def dense_flops(self) -> float:
        return sum(sum(s.dense.values()) for s in self.scales)

    @property
    def sparse_flops(self) -> float:
        return sum(sum(s.sparse.values()) for s in self.scales)

    @property
    def savings(self) -> float:
        return 1 - self.sparse_flops / self.dense_flops

    def by_component(self, which: str) -> dict[str, float]:
        return {c: sum(getattr(s, which).get(c, 0.0) for s in self.scales) for c in COMPONENTS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense_flops": self.dense_flops,
            "sparse_flops": self.sparse_flops,
            "savings": self.savings,
            "ideal_speedup": self.dense_flops / self.sparse_flops,
            "per_image_with_cfg": True,
            "num_experts": self.num_experts,
            "policy": self.policy,
            "arch": self.arch,
            "components": {"dense": self.by_component("dense"), "sparse": self.by_component("sparse")},
            "per_scale": [
                {
                    "scale": s.scale,
                    "tokens": s.tokens,
                    "kept_tokens": s.kept_tokens,
                    "kept_experts": s.kept_experts,
                    "dense_flops": sum(s.dense.values()),
                    "sparse_flops": sum(s.sparse.values()),
                    "dense": s.dense,
                    "sparse": s.sparse,
                }
                for s in self.scales
            ],
        }


def _scale_flops(
    cfg: VARConfig, plan: ScalePlan, kv_len: int, *, experts_per_token: float, num_experts: int, selector_blocks: int
) -> dict[str, float]:
    """One scale of one image: ``plan.keep_tokens`` tokens through every block (over a KV cache
    of ``kv_len``), each through ``experts_per_token`` experts; the selector on ``selector_blocks``."""
    C, D, V = cfg.embed_dim, cfg.depth, cfg.vocab_size
    n, kept, rows = plan.tokens, plan.keep_tokens, 2 if plan.guided else 1
    d_e = cfg.ffn_dim // num_experts if num_experts else cfg.ffn_dim
    routed = plan.sparse_experts(num_experts)
    means = routed and cfg.expert_means  # (1 - chosen) @ dropped_mean: T x N x C
    ffn_width = experts_per_token * d_e if routed else cfg.ffn_dim
    hw = cfg.patch_nums[-1]
    adaln_per_row = 2 * C * 6 * C * (1 if cfg.shared_aln else D) + 2 * C * 2 * C  # blocks (or shared) + head
    return {
        "embed": 2.0 * n * cfg.vae_dim * C if n > 1 else 0.0,  # once per image, before the CFG rows are repeated
        "adaln": float(rows * adaln_per_row),
        "qkv": 2.0 * D * rows * (n if plan.skipped_kv else kept) * C * 3 * C,  # skipped tokens' keys too
        "attention": 4.0 * D * rows * kept * kv_len * C,
        "proj": 2.0 * D * rows * kept * C * C,
        "ffn": 4.0 * D * rows * kept * C * ffn_width + (2.0 * D * rows * kept * num_experts * C if means else 0.0),
        "router": 2.0 * D * rows * kept * C * num_experts if routed else 0.0,
        "selector": 2.0 * selector_blocks * rows * n * C,
        "head": 2.0 * rows * n * C * V,
        "vae_phi": 2.0 * cfg.vae_dim * cfg.vae_dim * 9 * hw * hw,  # once per image
        "deltas": 0.0,
    }


def _delta_flops(cfg: VARConfig, plan: ScalePlan) -> float:
    """The deltas (rank r) from the first scale the policy changes: x A^T B^T on qkv's and proj's
    tokens and on the head."""
    C, r, rows = cfg.embed_dim, cfg.delta_rank, 2 if plan.guided else 1
    qkv_tokens = plan.tokens if plan.skipped_kv else plan.keep_tokens
    per_block = qkv_tokens * (C + 3 * C) + plan.keep_tokens * (C + C)
    return 2.0 * r * rows * (cfg.depth * per_block + plan.tokens * (C + cfg.vocab_size))


def _selector_blocks(policy: SparsityPolicy, plan: ScalePlan, si: int, depth: int) -> int:
    """How many blocks run the (C -> 1) selector at a scale: every block for ActVAR, block 0 at
    the first sparse scale for the fixed rule, none for the others (their scores are not matmuls)."""
    if not plan.sparse_tokens or plan.token_rule not in ("selector", "fixed"):
        return 0
    if plan.token_rule == "selector":
        return depth
    first_sparse = min(s - 1 for s, r in zip(policy.scales, policy.token_rates) if r < 1)
    return 1 if si == first_sparse else 0


def count_flops(
    cfg: VARConfig,
    policy: SparsityPolicy | None,
    num_experts: int | None = None,
    experts_per_token: Mapping[int, float] | None = None,
) -> FlopsReport:
    """FLOPs of one image's generation (both CFG rows while guided), dense and under ``policy``.

    ``experts_per_token`` gives, for the threshold rule, the mean number of experts each kept
    token ran at a (0-based) scale: the rule is data-dependent, so it is measured."""
    N = num_experts if num_experts is not None else (cfg.num_experts or 16)
    policy = policy or SparsityPolicy.dense()
    policy.validate_for(cfg)
    dense_policy = SparsityPolicy.dense()
    scales, kv_dense, kv_sparse, deltas_on = [], 0, 0, False
    for si in range(len(cfg.patch_nums)):
        dense_plan, plan = dense_policy.plan(si, cfg.patch_nums, N), policy.plan(si, cfg.patch_nums, N)
        kv_dense += dense_plan.tokens
        kv_sparse += plan.tokens if plan.skipped_kv else plan.keep_tokens
        per_token = float(plan.keep_experts)
        if plan.threshold is not None:
            if experts_per_token is None or si not in experts_per_token:
                raise ConfigError("the threshold rule's FLOPs depend on the images", "measure them with actvar compare")
            per_token = experts_per_token[si]
        s = ScaleFlops(scale=si + 1, tokens=plan.tokens, kept_tokens=plan.keep_tokens, kept_experts=per_token)
        s.dense = _scale_flops(cfg, dense_plan, kv_dense, experts_per_token=N, num_experts=N, selector_blocks=0)
        if si < policy.generated_scales(len(cfg.patch_nums)):
            blocks = _selector_blocks(policy, plan, si, cfg.depth)
            s.sparse = _scale_flops(
                cfg, plan, kv_sparse, experts_per_token=per_token, num_experts=N, selector_blocks=blocks
            )
            deltas_on = deltas_on or plan.sparse_tokens or plan.sparse_experts(N) or not plan.guided
            s.sparse["deltas"] = _delta_flops(cfg, plan) if deltas_on and cfg.delta_rank else 0.0
        else:
            s.sparse, s.kept_tokens = dict.fromkeys(COMPONENTS, 0.0), 0  # a skipped scale costs nothing
        scales.append(s)
    arch = {"depth": cfg.depth, "embed_dim": cfg.embed_dim, "patch_nums": list(cfg.patch_nums)}
    return FlopsReport(arch=arch, policy=policy.to_dict(), num_experts=N, scales=scales)


def paper_eq12_savings(cfg: VARConfig, policy: SparsityPolicy, num_experts: int = 16) -> float:
    """The paper's eq. 12 taken literally (eta, mu = fraction of tokens / weights saved),
    divided by our dense count without CFG rows; for comparison only."""
    H, N = cfg.embed_dim, num_experts
    total = 0.0
    for s, t_rate, w_rate in zip(policy.scales, policy.token_rates, policy.weight_rates):
        L = cfg.patch_nums[s - 1] ** 2
        eta, mu = 1 - t_rate, 1 - w_rate
        total += cfg.depth * (8 * eta * L * H * H * (1 + 2 * mu) - 2 * L * H * (1 + (1 - eta) * N))
    no_cfg = SparsityPolicy(scales=(), token_rates=(), weight_rates=(), guidance_off=len(cfg.patch_nums))
    dense = count_flops(cfg, no_cfg, num_experts).sparse_flops
    return total / dense
