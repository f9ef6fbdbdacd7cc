"""Method names, their parameters, and the policy each method runs with (no model needed).

``compare`` and ``moefy --method`` build the methods' models (``methods.py``); ``flops --method``
needs only their policies.
"""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .policy import SparsityPolicy

# family -> (default parameter, what it is)
FAMILIES: dict[str, tuple[str | None, str]] = {
    "dense": (None, "the dense model: the reference row"),
    "actvar": (None, "ActVAR: a model file (actvar:PATH), or the base converted without training"),
    "actvar-tokens": (None, "ActVAR without dynamic weights (Table 3): adaptive tokens only"),
    "actvar-experts": (None, "ActVAR without adaptive tokens (Table 3): dynamic experts only"),
    "static-experts": ("0.75", "static weight pruning (Table 5): the same experts for every token"),
    "fixed-tokens": ("0.75", "fixed token pruning (Table 4): positions chosen once, at the first sparse scale"),
    "fastvar": ("0.5", "FastVAR: cached token pruning at the last two scales (pruning ratio)"),
    "dmoe": ("0.9", "DMoE-VAR / D2DMoE: dynamic-k experts by predicted norm, last three scales (tau)"),
    "skip-last": ("1", "stop before the last N scales and decode what is there"),
    "cfg-off": ("2", "no classifier-free guidance at the last N scales"),
    "cfg-sharp": ("1", "no guidance at the last N scales; the conditional logits sharpened by 1 + t there"),
    "ear": ("0.75", "EAR's centre-outward order as a fixed token priority at the last two scales (rate)"),
    "skipped-kv": (None, "in a stack: skipped tokens stay keys of the blocks that skip them (docs/actvar.md)"),
    "skipped-update": (None, "in a stack: skipped tokens receive the block's previous-scale update (docs/actvar.md)"),
    "int8": (None, "in a stack: int8 weights, per output channel (actvar quantize)"),
    "kv-int8": (None, "in a stack: an int8 KV cache, a scale per token and head (a quarter of float32)"),
    "int4": (None, "in a stack: int4 weights, in groups of 128 inputs (actvar quantize)"),
    "w8a8": (None, "in a stack: int8 weights and int8 activations per token: int8 matrix products"),
}
DMOE_RAMP = (0.5, 0.75, 1.0)  # tau_s over the last three scales, growing with resolution


def parse_method(spec: str) -> tuple[str, str | None]:
    """One part: ``family`` or ``family:parameter``."""
    family, sep, arg = spec.strip().partition(":")
    if family in ("skipped-kv", "skipped-update", "int8", "int4", "w8a8", "kv-int8", "dense") and sep:
        raise ConfigError(f"{family} takes no parameter (got {spec!r})")
    if family not in FAMILIES:
        raise ConfigError(f"unknown method {family!r}", f"use one of {', '.join(FAMILIES)}")
    if sep and not arg:
        raise ConfigError(f"method {spec!r} has an empty parameter", f"e.g. {family}:{FAMILIES[family][0] or 'PATH'}")
    return family, arg or FAMILIES[family][0]


def _fractions(family: str, arg: str, n: int, low: float = 0.0) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in arg.split(","))
    except ValueError:
        raise ConfigError(f"{family}:{arg}: the parameter is not a number (or one per scale)") from None
    if len(values) not in (1, n) or not all(low < v <= 1 for v in values):
        interval = "[0, 1]" if low < 0 else f"({low:g}, 1]"
        raise ConfigError(f"{family}:{arg}: give one value in {interval}, or one per scale ({n})")
    return values


def _count(family: str, arg: str, most: int) -> int:
    if not arg.isdigit() or not 0 <= int(arg) < most:
        raise ConfigError(f"{family}:{arg}: give a number of scales from 0 (none) to {most - 1}")
    return int(arg)


def last(num_scales: int, n: int) -> tuple[int, ...]:
    return tuple(range(num_scales - n + 1, num_scales + 1))


def method_policy(family: str, arg: str | None, S: int, actvar_policy: SparsityPolicy | None = None):
    """The policy a method runs with on a model of S scales (no model needed)."""
    two, three = last(S, 2), last(S, 3)
    if family.startswith("actvar"):
        p = actvar_policy or SparsityPolicy(scales=two)
        if family == "actvar-tokens":  # Table 3: the model's own token rule, every expert
            return dataclasses.replace(p, weight_rates=(1.0,) * len(p.scales), expert_rule="router", thresholds=())
        if family == "actvar-experts":
            return dataclasses.replace(p, token_rates=(1.0,) * len(p.scales), skipped_kv=False, skipped_update=False)
        return p
    if family == "static-experts":
        return SparsityPolicy(scales=two, token_rates=(1.0,), weight_rates=_fractions(family, arg, 2))
    if family == "fixed-tokens":
        return SparsityPolicy(
            scales=two, token_rates=_fractions(family, arg, 2), weight_rates=(1.0,), token_rule="fixed"
        )
    if family == "fastvar":
        rates = tuple(1 - r for r in _fractions(family, arg, 2, low=-1e-9))
        if not all(r > 0 for r in rates):
            raise ConfigError(f"fastvar:{arg}: a pruning ratio below 1 keeps some tokens")
        return SparsityPolicy(scales=two, token_rates=rates, weight_rates=(1.0,), token_rule="far-from-mean")
    if family == "dmoe":
        (tau,) = _fractions(family, arg, 1, low=-1e-9) if arg != "0" else (0.0,)
        return SparsityPolicy(
            scales=three,
            token_rates=(1.0,),
            weight_rates=(1.0,),
            expert_rule="threshold",
            thresholds=tuple(tau * r for r in DMOE_RAMP),
        )
    if family == "skip-last":
        return SparsityPolicy(scales=(), token_rates=(), weight_rates=(), skip_last=_count(family, arg, S))
    if family in ("cfg-off", "cfg-sharp"):
        n = _count(family, arg, S + 1)
        return SparsityPolicy(
            scales=(), token_rates=(), weight_rates=(), guidance_off=n, guidance_sharpen=family == "cfg-sharp" and n > 0
        )
    return SparsityPolicy(scales=two, token_rates=_fractions(family, arg, 2), weight_rates=(1.0,), token_rule="centre")
