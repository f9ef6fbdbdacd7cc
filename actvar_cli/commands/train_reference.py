"""``actvar train-reference`` (hidden): train the built-in reference model from scratch; resumable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..progress import Progress
from ..reference.training import install_weights, train_reference
from .result import Result


@dataclass
class TrainReferenceRequest:
    out_dir: Path = Path("runs/reference")
    install: bool = False  # copy the weights and record into the package


@dataclass
class TrainReferenceResult(Result):
    record: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.record


def run(req: TrainReferenceRequest, progress: Progress | None = None) -> TrainReferenceResult:
    record = train_reference(req.out_dir, progress=progress)
    if req.install:
        install_weights(req.out_dir)
    return TrainReferenceResult(record)
