"""What a command returns: a dataclass whose ``to_dict`` is the command's ``--json`` output."""

from __future__ import annotations

import dataclasses
from typing import Any


class Result:
    """Mixin for result dataclasses: ``to_dict`` gives their fields as plain JSON-ready values."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value
