"""Command-line values (lists, ranges, KEY=VALUE pairs) parsed into what the library takes.

Only the CLI imports this module. A value that cannot be parsed is a ``ConfigError``: one
line, exit code 2.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import ConfigError
from ..train.recipes import load_yaml

MAX_LIST = 100_000  # values a list option may expand to (ImageNet has 1,000 classes)


def parse_int_list(text: str, what: str) -> list[int]:
    """``0,7,42`` or ranges ``0-9``; an empty item is an error, and so is a list past ``MAX_LIST``."""
    values: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if "-" in part[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                if len(values) + hi - lo + 1 > MAX_LIST:
                    raise ConfigError(f"{what} {text!r} names more than {MAX_LIST} values", "give a shorter list")
                values.extend(range(lo, hi + 1))
            else:
                values.append(int(part))
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a list of integers", "write e.g. 0,7,42 or 0-9") from None
    if len(values) > MAX_LIST:
        raise ConfigError(f"{what} names more than {MAX_LIST} values", "give a shorter list")
    return values


def parse_float_list(text: str, what: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",")]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a list of numbers", "write e.g. 0.75,0.5") from None


def policy_flags(scales: str | None, token_rate: float | None, token_rates: str | None, weight_rate: float | None):
    """The policy options as ``with_policy_flags`` takes them."""
    return {
        "scales": parse_int_list(scales, "--scales") if scales else None,
        "token_rate": token_rate,
        "token_rates": parse_float_list(token_rates, "--token-rates") if token_rates else None,
        "weight_rate": weight_rate,
    }


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs, values read as YAML (numbers, lists, strings)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not KEY=VALUE", "e.g. --set teacher_top_k=600")
        if not value.strip():
            raise ConfigError(f"--set {item!r} has no value", "give one after the =, e.g. --set teacher_top_k=600")
        try:
            values[key.strip().replace("-", "_")] = load_yaml(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
    return values


def request(cls, params: dict[str, Any], **changes: Any):
    """A library request dataclass from a command's parsed options (the fields it names), with
    ``changes`` (parsed lists, resolved paths) replacing the raw values."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in {**params, **changes}.items() if k in names})
