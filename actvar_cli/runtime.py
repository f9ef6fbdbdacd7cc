"""Where and in which precision work runs: CUDA with bf16/fp16 autocast when present, else the CPU.

A ``Runtime`` travels as one value instead of a (device, dtype) pair: commands pick it once from
``--device`` and ``--dtype``, and the library asks it for autocast and for a host sync.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import ConfigError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def use_cuda(name: str = "auto") -> bool:
    """Whether a job asked to run on ``name`` (auto, cpu, cuda, cuda:N) runs on a GPU."""
    return name != "cpu" and torch.cuda.is_available()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available", "use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}", "use auto, cpu or cuda") from e


def resolve_dtype(name: str | None, device: torch.device) -> str:
    """``auto`` is bf16 autocast on GPUs that support it and fp32 on the CPU."""
    name = name or "auto"
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}", "use fp32, bf16 or fp16")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 autocast is for GPUs", "use --dtype fp32 or bf16 on the CPU")
    return name


@dataclass(frozen=True)
class Runtime:
    """A device and the autocast dtype of the transformer (weights stay float32)."""

    device: torch.device = torch.device("cpu")
    dtype: str = "fp32"  # fp32 | bf16 | fp16

    @classmethod
    def pick(cls, device: str | torch.device = "auto", dtype: str | None = "auto") -> Runtime:
        dev = device if isinstance(device, torch.device) else pick_device(device)
        return cls(dev, resolve_dtype(dtype, dev))

    def autocast(self):
        """Mixed precision for the transformer, or nothing in fp32."""
        if DTYPES.get(self.dtype) is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.dtype])

    def synchronize(self) -> None:
        """Wait for the GPU (timing only: never inside the generation loop)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": self.dtype}


CPU = Runtime()
