"""How long-running library work reports progress, without printing anything itself."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """``progress(what, done, total, info="")``: ``what`` names the task ("sampling", "stage 1",
    ...) so that one callback can keep a bar per task; ``info`` is a short status line."""

    def __call__(self, what: str, done: int, total: int, info: str = "") -> None: ...
