"""The built-in model ``tiny``: the trained reference model that ships inside the package.

A small VAR with its own VQVAE, trained here on the procedural shapes set (``actvar
train-reference``; docs/quality.md), usable wherever a checkpoint is expected with no
download: ``tiny`` names the VAR, and ``--vae tiny`` (its default) its VQVAE. The shapes
classifier that serves as its yardstick (``--ref shapes``) ships beside it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .config import BUILTIN_NAME

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "reference" / "weights"  # data only: nothing is imported
WEIGHT_FILES = {
    "var": "reference-var.safetensors",
    "vae": "reference-vae.safetensors",
    "classifier": "reference-classifier.safetensors",
}

__all__ = ["BUILTIN_NAME", "WEIGHT_FILES", "builtin_state_dict", "weights_path"]


def weights_path(kind: str) -> Path:
    """The shipped weights file of ``"var"``, ``"vae"`` or ``"classifier"``."""
    return WEIGHTS_DIR / WEIGHT_FILES[kind]


@functools.lru_cache(maxsize=3)
def _state_dict(kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:

    path = weights_path(kind)
    if not path.exists():
        raise CheckpointError(f"the built-in model's {kind} weights are missing ({path})", "reinstall actvar")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def builtin_state_dict(kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A fresh copy of the built-in ``"var"``, ``"vae"`` or ``"classifier"`` weights, and their metadata."""
    sd, meta = _state_dict(kind)
    return {k: v.clone() for k, v in sd.items()}, dict(meta)
