"""``actvar random-weights``: an official architecture with seeded random weights, for dry runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import atomic_write_with, check_output_file
from ..models.checkpoint import save_safetensors
from ..models.config import VAEConfig, arch_config
from ..models.random_weights import random_state_dict
from ..models.var import VAR
from ..models.vqvae import VQVAE
from .result import Result


@dataclass
class RandomWeightsRequest:
    arch: str  # dN, tiny or vae
    output: Path
    seed: int = 0


@dataclass
class RandomWeightsResult(Result):
    arch: str
    seed: int
    output: str


def run(req: RandomWeightsRequest) -> RandomWeightsResult:
    output = Path(req.output)
    check_output_file(output, (".safetensors", ".pth"))
    if req.arch.lower() == "vae":
        sd = random_state_dict(VQVAE(VAEConfig()), req.seed)
        meta = {"format": "actvar", "kind": "vqvae", "vae_config": VAEConfig().to_dict(), "random_seed": req.seed}
    else:
        cfg = arch_config(req.arch)
        sd = random_state_dict(VAR(cfg), req.seed)
        meta = {"format": "actvar", "kind": "var", "var_config": cfg.to_dict(), "random_seed": req.seed}
    if output.suffix == ".pth":
        atomic_write_with(output, lambda tmp: torch.save(sd, tmp))
    else:
        save_safetensors(sd, output, meta)
    return RandomWeightsResult(req.arch, req.seed, str(output))
