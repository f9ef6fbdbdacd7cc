"""Where and in which precision to run: CUDA with bf16/fp16 autocast when present, else the CPU."""

from __future__ import annotations

import contextlib

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


def default_dtype(device: torch.device) -> str:
    """bf16 autocast on GPUs that support it, fp32 on the CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_dtype(name: str | None, device: torch.device) -> str:
    name = name or "auto"
    if name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}", "use fp32, bf16 or fp16")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 autocast is for GPUs", "use --dtype fp32 or bf16 on the CPU")
    return name


def autocast(device: torch.device, dtype: str):
    """Mixed precision for the transformer; weights stay float32."""
    if DTYPES.get(dtype) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
