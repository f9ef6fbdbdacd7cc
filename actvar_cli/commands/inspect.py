"""``actvar inspect``: what a checkpoint is (kind, inferred config, parameters, dtype, hash).

Parameters are counted at the float model's shapes, so a quantized file reports the parameters of
the model it holds, and its bytes per parameter (the weights' bytes, without derived buffers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..files import sha256_file
from ..models.checkpoint import read_checkpoint, user_metadata
from ..quant.apply import QWEIGHT, logical_state_dict
from .loading import resolve
from .result import Result

BUFFER_SUFFIXES = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias", "ema_vocab_hit_SV")


@dataclass
class InspectRequest:
    checkpoint: str
    num_heads: int | None = None
    with_hash: bool = True


@dataclass
class InspectResult(Result):
    report: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.report


def run(req: InspectRequest) -> InspectResult:
    source = resolve(req.checkpoint)
    sd, info = read_checkpoint(source, req.num_heads)
    shapes = logical_state_dict(sd, info.quantization, source)  # quantized layers at their float shapes
    params = sum(t.numel() for k, t in shapes.items() if not k.endswith(BUFFER_SUFFIXES))
    stored = sum(t.numel() * t.element_size() for k, t in sd.items() if not k.endswith(BUFFER_SUFFIXES))
    dtypes = sorted(
        {str(t.dtype).removeprefix("torch.") for k, t in sd.items() if t.is_floating_point() or k.endswith(QWEIGHT)}
    )
    report: dict[str, Any] = {
        "source": source,
        "kind": info.kind,
        "format": info.format,
        "parameters": params,
        "parameters_human": f"{params / 1e6:.1f}M" if params < 1e9 else f"{params / 1e9:.2f}B",
        "tensors": len(sd),
        "dtype": ",".join(dtypes),
        "bytes_per_parameter": round(stored / max(params, 1), 4),
    }
    if info.quantization is not None:
        report["quantization"] = info.quantization
    if req.with_hash and info.format != "builtin":
        report["sha256"] = sha256_file(source)
    if info.var_config is not None:
        report["config"] = info.var_config.to_dict()
        report["image_size"] = info.var_config.image_size
    else:
        report["config"] = info.vae_config.to_dict()
    if info.policy is not None:
        report["policy"] = info.policy.to_dict()
    meta = user_metadata(info.metadata)
    if meta:
        report["metadata"] = meta
    return InspectResult(report)
