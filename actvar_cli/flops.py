"""Analytic FLOPs of generation, per scale and per component, for dense VAR and ActVAR.

Counts are of multiply-adds times two (what ``torch.utils.flop_counter`` reports), for one
image generated with classifier-free guidance (two transformer rows: conditional and
unconditional), over everything the generation loop runs: embeddings, AdaLN, attention
projections, attention over the KV cache, FFN / experts, router and selector, the head,
and the VQVAE's phi convs that build the next scale's input. The final VAE decode is not
part of generation and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import SparsityPolicy, VARConfig

COMPONENTS = ("embed", "adaln", "qkv", "attention", "proj", "ffn", "router", "selector", "head", "vae_phi")

# Paper figures (ActVAR, Tables 1, 2 and 6): (arch, scales, token rates, weight rate) -> saving
PAPER_SAVINGS = [
    ("d16", (9, 10), (0.75, 0.75), 0.75, 0.202),
    ("d20", (9, 10), (0.75, 0.75), 0.75, 0.212),
    ("d24", (9, 10), (0.75, 0.75), 0.75, 0.218),
    ("d30", (9, 10), (0.75, 0.75), 0.75, 0.223),
    ("d20", (9, 10), (0.5, 0.25), 0.5, 0.432),
    ("d20", (9, 10), (0.5, 0.75), 0.25, 0.399),
    ("d20", (9, 10), (0.5, 0.5), 0.75, 0.328),
    ("d20", (9, 10), (0.75, 0.5), 0.75, 0.282),
    ("d20", (7, 8), (0.75, 0.75), 0.75, 0.081),
    ("d20", (9, 10), (0.75, 0.75), 1.0, 0.142),  # Table 3: without dynamic weights
    ("d20", (9, 10), (1.0, 1.0), 0.75, 0.094),  # Table 3: without adaptive tokens
]


@dataclass
class ScaleFlops:
    scale: int  # 1-based
    tokens: int
    kept_tokens: int
    kept_experts: int
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
    cfg: VARConfig,
    si: int,
    n: int,
    kept: int,
    kv_len: int,
    experts_kept: int,
    num_experts: int,
    selecting: bool,
    routing: bool,
    rows: int,
) -> dict[str, float]:
    C, D, V = cfg.embed_dim, cfg.depth, cfg.vocab_size
    F = cfg.ffn_dim
    d_e = F // num_experts if num_experts else F
    ffn_width = experts_kept * d_e if routing else F
    hw = cfg.patch_nums[-1]
    adaln_per_row = 2 * C * 6 * C * (1 if cfg.shared_aln else D) + 2 * C * 2 * C  # blocks (or shared) + head
    return {
        "embed": 2.0 * rows * n * cfg.vae_dim * C if si > 0 else 0.0,
        "adaln": float(rows * adaln_per_row),
        "qkv": 2.0 * D * rows * kept * C * 3 * C,
        "attention": 4.0 * D * rows * kept * kv_len * C,
        "proj": 2.0 * D * rows * kept * C * C,
        "ffn": 4.0 * D * rows * kept * C * ffn_width,
        "router": 2.0 * D * rows * kept * C * num_experts if routing else 0.0,
        "selector": 2.0 * D * rows * n * C if selecting else 0.0,
        "head": 2.0 * rows * n * C * V,
        "vae_phi": 2.0 * cfg.vae_dim * cfg.vae_dim * 9 * hw * hw,  # one image (not per CFG row)
    }


def count_flops(
    cfg: VARConfig,
    policy: SparsityPolicy | None,
    num_experts: int | None = None,
    cfg_rows: int = 2,
) -> FlopsReport:
    """FLOPs of one image's generation, dense and under ``policy``."""
    N = num_experts if num_experts is not None else (cfg.num_experts or 16)
    policy = policy or SparsityPolicy.dense()
    policy.validate_for(cfg)
    scales = []
    kv_dense = kv_sparse = 0
    for si, pn in enumerate(cfg.patch_nums):
        n = pn * pn
        kt = policy.tokens_kept(si, n)
        kw = policy.experts_kept(si, N)
        selecting, routing = kt < n, kw < N
        kv_dense += n
        kv_sparse += kt
        s = ScaleFlops(scale=si + 1, tokens=n, kept_tokens=kt, kept_experts=kw if routing else N)
        s.dense = _scale_flops(cfg, si, n, n, kv_dense, N, N, False, False, cfg_rows)
        s.sparse = _scale_flops(cfg, si, n, kt, kv_sparse, kw, N, selecting, routing, cfg_rows)
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
    dense = count_flops(cfg, None, num_experts, cfg_rows=1).dense_flops
    return total / dense


def paper_table() -> list[dict[str, Any]]:
    """Our savings beside the paper's, for every setting the paper reports."""
    from .config import official_var_config

    rows = []
    for arch, scales, token_rates, weight_rate, paper in PAPER_SAVINGS:
        cfg = official_var_config(int(arch[1:]))
        policy = SparsityPolicy(scales=scales, token_rates=token_rates, weight_rates=(weight_rate,))
        report = count_flops(cfg, policy, 16)
        rows.append(
            {
                "arch": arch,
                "scales": list(scales),
                "token_rates": list(token_rates),
                "weight_rate": weight_rate,
                "paper_savings": paper,
                "our_savings": report.savings,
                "paper_eq12_savings": paper_eq12_savings(cfg, policy, 16),
            }
        )
    return rows
