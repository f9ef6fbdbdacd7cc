"""What generation computes at each scale: the ActVAR policy, and the other ways of making VAR cheaper.

ActVAR (paper section 4.1) keeps ``token_rate`` of each sparse scale's tokens in every block,
chosen by that block's learned selector, and lets each kept token use ``weight_rate`` of
the experts, chosen by the router. The same policy object also describes the baselines and
training-free methods that actvar compares with it (docs/other-methods.md):

* token rules: ``selector`` (ActVAR: per block and sample), ``fixed`` (Table 4: positions
  ranked once, by block 0's selector at the first sparse scale, and kept by every block and
  the later scales), ``centre`` (EAR's centre-outward order as a fixed priority) and
  ``far-from-mean`` (FastVAR: per block and sublayer, the tokens farthest from the scale's
  mean; skipped tokens receive the previous scale's output of that sublayer);
* expert rules: ``router`` (top ``weight_rate`` of the experts; a router with zero weights
  and a bias is static pruning, Table 5) and ``threshold`` (D2DMoE / DMoE-VAR: the experts
  whose predicted output norm is at least ``tau_s`` times the largest);
* ``skipped_update``: with the selector, fixed or centre rule, a token a block skips receives that
  block's update of the previous scale, resized (FastVAR's cache, for a rule that skips whole
  blocks), instead of passing through unchanged;
* ``guidance_off``: the last N scales run only the conditional rows (no guidance there);
  ``guidance_sharpen``: and there the conditional logits are multiplied by ``1 + t_s``, what
  guidance gives when the unconditional distribution is flat (docs/other-methods.md);
* ``skip_last``: the last N scales are not generated at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:  # the configuration is read, never built, here
    from ..models.config import VARConfig

TOKEN_RULES = ("selector", "fixed", "centre", "far-from-mean")
EXPERT_RULES = ("router", "threshold")
NEEDS_SELECTOR = ("selector", "fixed")


@dataclass(frozen=True)
class SparseSegment:
    """A sparse scale as a slice of the token sequence, with how much of it is kept."""

    scale_index: int  # 0-based
    start: int
    end: int
    keep_tokens: int  # K_t
    keep_experts: int  # K_w
    prev_start: int = 0  # where the previous scale starts (it ends at ``start``)

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ScalePlan:
    """What every block computes at one scale of generation."""

    tokens: int  # the scale's token count n
    keep_tokens: int  # K_t: tokens each block (or sublayer) computes
    token_rule: str
    keep_experts: int  # K_w with the router rule; the expert count when dense or thresholded
    threshold: float | None  # tau_s of the threshold rule
    guided: bool  # conditional and unconditional rows (CFG), or the conditional ones only
    skipped_kv: bool = False  # skipped tokens are keys (not queries) of the blocks that skip them
    skipped_update: bool = False  # skipped tokens receive the block's previous-scale update, resized
    record_update: bool = False  # keep each block's update: the next scale fills its skipped tokens with it

    @property
    def sparse_tokens(self) -> bool:
        return self.keep_tokens < self.tokens

    def sparse_experts(self, num_experts: int) -> bool:
        return num_experts > 0 and (self.threshold is not None or self.keep_experts < num_experts)


@dataclass
class SparsityPolicy:
    """Where and how much sparsity applies. ``scales`` are 1-based; rates are fractions in (0, 1]."""

    scales: tuple[int, ...] = (9, 10)
    token_rates: tuple[float, ...] = (0.75,)  # one rate fits every scale
    weight_rates: tuple[float, ...] = (0.75,)
    token_rule: str = "selector"
    expert_rule: str = "router"
    thresholds: tuple[float, ...] = field(default_factory=tuple)  # tau_s per sparse scale (threshold rule)
    guidance_off: int = 0
    guidance_sharpen: bool = False  # where guidance is off, sample from the conditional logits times 1 + t_s
    skip_last: int = 0
    skipped_kv: bool = False  # skipped tokens still give their keys and values (docs/actvar.md)
    skipped_update: bool = False  # skipped tokens receive the block's previous-scale update (docs/actvar.md)
    kv_bits: int = 0  # 8: the KV cache keeps int8 keys and values (a stack's kv-int8 part)

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        n = len(self.scales)
        self.token_rates = _per_scale(self.token_rates, n)
        self.weight_rates = _per_scale(self.weight_rates, n)
        self.thresholds = _per_scale(self.thresholds, n) if self.thresholds else ()
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
        self._check_rules(n)

    def _check_rules(self, n: int) -> None:
        if self.token_rule not in TOKEN_RULES:
            raise ConfigError(f"unknown token rule {self.token_rule!r}", f"use one of {', '.join(TOKEN_RULES)}")
        if self.expert_rule not in EXPERT_RULES:
            raise ConfigError(f"unknown expert rule {self.expert_rule!r}", f"use one of {', '.join(EXPERT_RULES)}")
        if self.expert_rule == "threshold" and len(self.thresholds) != n:
            raise ConfigError(f"the threshold rule needs one threshold per sparse scale ({n})")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ConfigError(
                f"thresholds {self.thresholds} must lie in [0, 1]", "tau_s compares with the largest norm"
            )
        if self.guidance_off < 0 or self.skip_last < 0:
            raise ConfigError("guidance_off and skip_last count scales: 0 or more")
        if self.guidance_sharpen and not self.guidance_off:
            raise ConfigError("guidance_sharpen acts where guidance is off: it is on everywhere", "set guidance_off")
        if self.kv_bits not in (0, 8):
            raise ConfigError(f"kv_bits {self.kv_bits}: the KV cache is int8 (8) or as computed (0)")
        if self.skipped_kv and self.token_rule == "far-from-mean":
            raise ConfigError("FastVAR's rule caches the outputs of skipped tokens, not their keys", "drop skipped_kv")
        if self.skipped_update and self.token_rule == "far-from-mean":
            raise ConfigError(
                "FastVAR's rule already gives skipped tokens the previous scale's outputs", "drop skipped_update"
            )

    def validate_for(self, cfg: VARConfig) -> None:
        n = len(cfg.patch_nums)
        for s in self.scales:
            if not 1 <= s <= n:
                raise ConfigError(f"scale {s} does not exist", f"this model has scales 1..{n}")
        if self.skip_last >= n or self.guidance_off > n:
            raise ConfigError(f"this model has {n} scales", "skip fewer scales than it has")

    def check_runnable(self, cfg: VARConfig) -> None:
        """A model runs this policy only if it has the experts and selectors the policy uses."""
        self.validate_for(cfg)
        uses_selector = self.token_rule in NEEDS_SELECTOR and any(r < 1 for r in self.token_rates)
        uses_experts = self.expert_rule == "threshold" or any(r < 1 for r in self.weight_rates)
        if (uses_selector or uses_experts) and not cfg.num_experts:
            raise ConfigError("this policy needs experts and selectors", "convert the model first (actvar moefy)")

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

    def threshold(self, si: int) -> float | None:
        """tau_s of the threshold rule at scale ``si``; None where every expert runs (tau 0 included)."""
        if self.expert_rule != "threshold" or si + 1 not in self.scales:
            return None
        return self.thresholds[self.scales.index(si + 1)] or None

    def fills_skipped(self, si: int, patch_nums: tuple[int, ...]) -> bool:
        """Scale ``si`` skips tokens that receive the previous scale's update."""
        return (
            self.skipped_update
            and si < len(patch_nums)
            and self.tokens_kept(si, patch_nums[si] ** 2) < patch_nums[si] ** 2
        )

    def plan(self, si: int, patch_nums: tuple[int, ...], num_experts: int) -> ScalePlan:
        n = patch_nums[si] ** 2
        return ScalePlan(
            tokens=n,
            keep_tokens=self.tokens_kept(si, n),
            token_rule=self.token_rule,
            keep_experts=self.experts_kept(si, num_experts),
            threshold=self.threshold(si) if num_experts else None,
            guided=si < len(patch_nums) - self.guidance_off,
            skipped_kv=self.skipped_kv,
            skipped_update=self.fills_skipped(si, patch_nums),
            record_update=self.fills_skipped(si + 1, patch_nums),
        )

    def generated_scales(self, num_scales: int) -> int:
        return num_scales - self.skip_last

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "scales": list(self.scales),
            "token_rates": list(self.token_rates),
            "weight_rates": list(self.weight_rates),
        }
        extra = {
            "token_rule": self.token_rule,
            "expert_rule": self.expert_rule,
            "thresholds": list(self.thresholds),
            "guidance_off": self.guidance_off,
            "guidance_sharpen": self.guidance_sharpen,
            "skip_last": self.skip_last,
            "skipped_kv": self.skipped_kv,
            "skipped_update": self.skipped_update,
            "kv_bits": self.kv_bits,
        }
        defaults = SparsityPolicy.dense()
        d.update({k: v for k, v in extra.items() if v != _listed(getattr(defaults, k))})  # ActVAR files stay as before
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SparsityPolicy:
        keys = (
            "token_rule",
            "expert_rule",
            "thresholds",
            "guidance_off",
            "guidance_sharpen",
            "skip_last",
            "skipped_kv",
            "skipped_update",
            "kv_bits",
        )
        return cls(
            scales=tuple(d["scales"]),
            token_rates=tuple(d["token_rates"]),
            weight_rates=tuple(d["weight_rates"]),
            **{k: tuple(d[k]) if isinstance(d[k], list) else d[k] for k in keys if k in d},
        )

    @classmethod
    def dense(cls) -> SparsityPolicy:
        return cls(scales=(), token_rates=(), weight_rates=())

    def __str__(self) -> str:
        return json.dumps(self.to_dict())


def _listed(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _per_scale(rates: tuple[float, ...] | list[float], n: int) -> tuple[float, ...]:
    rates = tuple(float(r) for r in rates)
    return rates * n if len(rates) == 1 else rates  # one rate fits any scales


def _ceil(x: float) -> int:
    # ceil that forgives float noise: 0.75 * 256 == 192.00000000000003 must give 192
    r = round(x)
    return r if abs(x - r) < 1e-9 else int(x) + (x > int(x))
