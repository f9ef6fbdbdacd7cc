"""Stacks: several methods at once, written ``a+b+c`` wherever a method is accepted.

Each part acts on its own share of the work: a token rule on some scales' tokens, an expert rule on
their FFNs, guidance off at the last scales, the last scales skipped, the weights quantized, and the
keys and values of skipped tokens kept. A stack's policy is the parts' policies merged scale by
scale; a stack that cannot hold is refused in one line before any model is built:

* two parts that prune tokens, or two that prune experts (one rule of each kind per stack);
* skipping a scale that another part prunes;
* two guidance parts (``cfg-off`` and ``cfg-sharp``), or ``cfg-sharp`` on a model trained without
  guidance at its last scales (its logits are already guided there);
* a part listed twice, two quantizations, or ``skipped-kv`` / ``skipped-update`` without a token
  rule (or with FastVAR's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..quant.apply import activations_of
from .methods import method_policy, parse_method
from .policy import SparsityPolicy

# part -> (weights, activations) of the quantization it applies
QUANT_SCHEMES = {"int8": ("int8", "float"), "int4": ("int4", "float"), "w8a8": ("int8", "int8")}
QUANT_PARTS = tuple(QUANT_SCHEMES)  # quantized after the model is built (actvar quantize)
FLAG_PARTS = ("skipped-kv", "skipped-update", "kv-int8")  # how skipped tokens are treated; how the KV cache is stored
SKIPPED_FLAGS = {"skipped-kv": "skipped_kv", "skipped-update": "skipped_update"}  # part -> policy field


@dataclass(frozen=True)
class Stack:
    """A method or a stack of them: its parts as (family, parameter), in the order written."""

    name: str
    parts: tuple[tuple[str, str | None], ...]

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(f for f, _ in self.parts)

    @property
    def quantization(self) -> str | None:
        return next((f for f in self.families if f in QUANT_PARTS), None)

    @property
    def quantization_scheme(self) -> tuple[str, str] | None:
        """(weights, activations) of its quantization part, as ``quantize_model`` takes them."""
        return QUANT_SCHEMES[self.quantization] if self.quantization else None

    @property
    def model_file(self) -> str | None:
        """The ActVAR file a part names (``actvar:PATH``), if any."""
        return next((a for f, a in self.parts if f == "actvar" and a), None)

    @property
    def policy_parts(self) -> tuple[tuple[str, str | None], ...]:
        return tuple((f, a) for f, a in self.parts if f not in QUANT_PARTS + FLAG_PARTS + ("dense",))

    @property
    def single(self) -> str:
        """The family of a one-part stack, else ``stack``."""
        return self.families[0] if len(self.parts) == 1 else "stack"


def quantization_part(scheme: Mapping[str, Any] | None) -> str | None:
    """The stack part that writes a file's quantization ``scheme`` (None: a float file)."""
    if not scheme:
        return None
    key = (scheme["weights"], activations_of(scheme))
    return next(part for part, applied in QUANT_SCHEMES.items() if applied == key)


def refuse_model_file(stack: Stack, command: str) -> None:
    """Commands that take the model as their argument do not take it again inside ``--method``."""
    if stack.model_file:
        hint = f"give it as the model: {command} {stack.model_file}"
        raise ConfigError(f"--method {stack.name}: names a model file", hint)


def parse_stack(spec: str) -> Stack:
    """``fastvar:0.5``, ``cfg-off:1+fixed-tokens:0.75+skipped-kv``, ``actvar:PATH+int8``, ..."""
    pieces = [p.strip() for p in spec.split("+")]
    if not spec.strip() or any(not p for p in pieces):
        raise ConfigError(f"method {spec!r} has an empty part", "write parts joined by +, e.g. cfg-off:1+fastvar:0.25")
    parts = tuple(parse_method(p) for p in pieces)
    families = [f for f, _ in parts]
    twice = sorted({f for f in families if families.count(f) > 1})
    if twice:
        raise ConfigError(f"{spec}: {', '.join(twice)} appears more than once", "give each part once")
    if len(parts) > 1 and "dense" in families:
        raise ConfigError(f"{spec}: dense is the reference, not a part of a stack")
    if sum(f in QUANT_PARTS for f in families) > 1:
        raise ConfigError(f"{spec}: one quantization per stack ({', '.join(QUANT_PARTS)})")
    return Stack(spec.strip(), parts)


def stack_policy(stack: Stack, num_scales: int, model_policy: SparsityPolicy | None = None) -> SparsityPolicy | None:
    """The policy of every part, merged scale by scale (None for the plain dense model)."""
    parts = [(f, method_policy(f, a, num_scales, model_policy)) for f, a in stack.policy_parts]
    flags = [f for f in stack.families if f in SKIPPED_FLAGS]
    if not parts and flags:
        raise ConfigError(f"{stack.name}: {flags[0]} changes a token rule, and the stack has none")
    if not parts and "kv-int8" not in stack.families:
        return model_policy
    merged = _merge(stack.name, parts, num_scales) if parts else model_policy or SparsityPolicy.dense()
    if "kv-int8" in stack.families:
        merged = dataclasses.replace(merged, kv_bits=8)
    for flag in flags:
        if not any(r < 1 for r in merged.token_rates) or merged.token_rule == "far-from-mean":
            raise ConfigError(f"{stack.name}: {flag} needs a token rule that skips tokens (not FastVAR's)")
        merged = dataclasses.replace(merged, **{SKIPPED_FLAGS[flag]: True})
    return merged


def _merge(name: str, parts: list[tuple[str, SparsityPolicy]], S: int) -> SparsityPolicy:
    tokens = [(f, p) for f, p in parts if any(r < 1 for r in p.token_rates)]
    experts = [(f, p) for f, p in parts if p.expert_rule == "threshold" or any(r < 1 for r in p.weight_rates)]
    for kind, found in (("prune tokens", tokens), ("prune experts", experts)):
        if len(found) > 1:
            raise ConfigError(f"{name}: {' and '.join(f for f, _ in found)} both {kind}", "keep one of them")
    token_part, expert_part = (tokens[0][1] if tokens else None), (experts[0][1] if experts else None)
    scales = sorted({s for _, p in (tokens + experts) for s in p.scales})
    guidance = [(f, p) for f, p in parts if p.guidance_off]
    trained = [f for f, p in guidance if f.startswith("actvar") and not p.guidance_sharpen]  # guidance-distilled
    rules = [f for f, _ in guidance if f not in trained]
    if len(rules) > 1:
        raise ConfigError(f"{name}: {' and '.join(rules)} both turn guidance off", "keep one of them")
    if "cfg-sharp" in rules and trained:  # its logits at those scales are already guided
        raise ConfigError(f"{name}: the model was trained without guidance at its last scales", "drop cfg-sharp")
    skip = max((p.skip_last for _, p in parts), default=0)
    if skip and any(s > S - skip for s in scales):
        raise ConfigError(f"{name}: it skips the last {skip} scale(s), which another part prunes", "drop one")
    return SparsityPolicy(
        scales=tuple(scales),
        token_rates=tuple(_rate(token_part, s, "token_rates") for s in scales) or (),
        weight_rates=tuple(_rate(expert_part, s, "weight_rates") for s in scales) or (),
        token_rule=token_part.token_rule if token_part else "selector",
        expert_rule=expert_part.expert_rule if expert_part else "router",
        thresholds=_thresholds(expert_part, scales),
        guidance_off=max((p.guidance_off for _, p in guidance), default=0),
        guidance_sharpen=any(p.guidance_sharpen for _, p in guidance),
        skip_last=skip,
        skipped_kv=bool(token_part and token_part.skipped_kv),
        skipped_update=bool(token_part and token_part.skipped_update),
        kv_bits=max((p.kv_bits for _, p in parts), default=0),
    )


def _rate(part: SparsityPolicy | None, scale: int, field: str) -> float:
    if part is None or scale not in part.scales:
        return 1.0
    return getattr(part, field)[part.scales.index(scale)]


def _thresholds(part: SparsityPolicy | None, scales: list[int]) -> tuple[float, ...]:
    """tau_s of the threshold rule at each merged scale; 0 (every expert) where it does not act."""
    if part is None or part.expert_rule != "threshold":
        return ()
    return tuple(part.thresholds[part.scales.index(s)] if s in part.scales else 0.0 for s in scales)
