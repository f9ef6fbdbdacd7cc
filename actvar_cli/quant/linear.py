"""Weight-only int8 and int4 linear layers, and the (de)quantization they are stored with.

int8: symmetric, one float32 scale per output row (``q = round(w / s)``, ``|q| <= 127``).
int4: symmetric, one float32 scale per group of ``group_size`` inputs of a row (``|q| <= 7``), two
values per byte: column ``2j`` in the low nibble, ``2j + 1`` in the high one, each stored as ``q + 8``.

A ``QuantLinear`` keeps only the integers and the scales. Its ``weight`` is a read-only property
that dequantizes on every access, so code written for ``nn.Linear`` (``F.linear(x, m.weight, b)``,
the expert kernels' views of ``fc1.weight``) runs unchanged while at most the layer in use has a
float copy, which is freed when the matmul is done.

The kernel, measured on this project's 2-core CPU (torch 2.14, float32, x 64x1024, w 4096x1024,
median of 7 repeats, with another job running): float ``F.linear`` 22 ms; dequantize then
``F.linear`` 37 ms (the dequantize alone 16 ms); ``torch.ops.aten._weight_int8pack_mm`` 198 ms.
The fused kernel's time grows with the rows of x (8 ms at 1 row, 32 at 8, 100 at 32): it wins only
below about 8 rows, and in bf16 (8 ms at 64 rows), which the CPU path does not run. So every layer
dequantizes then calls ``F.linear``, on the CPU and on CUDA. On CUDA, fused weight-only kernels
come from torchao's weight-only configs (``Int8WeightOnlyConfig``, ``Int4WeightOnlyConfig``);
torchao is not a dependency.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
INT8_MAX = 127
INT4_MAX = 7  # symmetric: -7..7, stored as 1..15
INT4_OFFSET = 8


def check_scheme(weights: str, group_size: int | None, in_features: int | None = None, name: str = "") -> None:
    """A known scheme, and for int4 an even group size that divides the layer's input width."""
    if weights not in SCHEMES:
        raise ConfigError(f"unknown weight format {weights!r}", "use --weights int8 or --weights int4")
    if weights == "int8":
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ConfigError(f"--group-size {group_size!r} must be an even integer of at least 2", "use e.g. 64 or 128")
    if in_features is not None and in_features % group_size:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0] or [2]
        where = f" of {name}" if name else ""
        raise ConfigError(
            f"--group-size {group_size} does not divide the input width {in_features}{where}",
            f"use a divisor such as {', '.join(map(str, divisors))}",
        )


def storage(weights: str, out_features: int, in_features: int, group_size: int | None):
    """(qweight shape, its dtype, scales shape) of a layer."""
    if weights == "int8":
        return (out_features, in_features), torch.int8, (out_features,)
    return (out_features, in_features // 2), torch.uint8, (out_features, in_features // group_size)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero row or group has scale 0: divide by 1 instead (its values round to 0 either way)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int8(w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row); the error per element is at most half its row's scale."""
    w_OI = w_OI.detach().float()
    scales_O = w_OI.abs().amax(dim=1) / INT8_MAX
    q_OI = torch.round(w_OI / _safe(scales_O)[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q_OI, scales_O


def dequantize_int8(q_OI: torch.Tensor, scales_O: torch.Tensor) -> torch.Tensor:
    return q_OI.to(scales_O.dtype).mul_(scales_O[:, None])


def pack_int4(q_OI: torch.Tensor) -> torch.Tensor:
    """Values in -8..7 (O, I) -> bytes (O, I/2): column 2j in the low nibble, 2j+1 in the high one."""
    n_out, n_in = q_OI.shape
    u_OH2 = (q_OI.to(torch.int16) + INT4_OFFSET).to(torch.uint8).view(n_out, n_in // 2, 2)
    return u_OH2[..., 0] | (u_OH2[..., 1] << 4)


def unpack_int4(p_OH: torch.Tensor) -> torch.Tensor:
    """Bytes (O, I/2) -> int8 values (O, I), the inverse of ``pack_int4``."""
    n_out, n_half = p_OH.shape
    u_OH2 = torch.stack((p_OH & 0xF, p_OH >> 4), dim=-1)
    return u_OH2.view(n_out, 2 * n_half).to(torch.int8).sub_(INT4_OFFSET)


def quantize_int4(w_OI: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (O, I/2), float32 scales (O, I/group)); the error is at most half a group's scale."""
    check_scheme("int4", group_size, w_OI.shape[1])
    n_out, n_in = w_OI.shape
    w_OGg = w_OI.detach().float().reshape(n_out, n_in // group_size, group_size)
    scales_OG = w_OGg.abs().amax(dim=2) / INT4_MAX
    q_OGg = torch.round(w_OGg / _safe(scales_OG)[..., None]).clamp_(-INT4_MAX, INT4_MAX)
    return pack_int4(q_OGg.reshape(n_out, n_in).to(torch.int8)), scales_OG


def dequantize_int4(p_OH: torch.Tensor, scales_OG: torch.Tensor) -> torch.Tensor:
    n_out, n_groups = scales_OG.shape
    w_OGg = unpack_int4(p_OH).to(scales_OG.dtype).view(n_out, n_groups, -1).mul_(scales_OG[..., None])
    return w_OGg.view(n_out, -1)


class QuantLinear(nn.Module):
    """``nn.Linear`` stored as int8 rows or packed int4 groups (buffers ``qweight``, ``scales``) and a
    float bias; ``weight`` is dequantized on each access and never kept."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weights: str = "int8",
        group_size: int | None = DEFAULT_GROUP_SIZE,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_scheme(weights, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weights = weights
        self.group_size = group_size if weights == "int4" else None
        q_shape, q_dtype, s_shape = storage(weights, out_features, in_features, self.group_size)
        self.register_buffer("qweight", torch.empty(q_shape, dtype=q_dtype, device=device))
        self.register_buffer("scales", torch.empty(s_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weights: str, group_size: int | None = DEFAULT_GROUP_SIZE) -> QuantLinear:
        w_OI = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weights=weights,
                    group_size=group_size, device=w_OI.device)  # fmt: skip
        q, s = quantize_int8(w_OI) if weights == "int8" else quantize_int4(w_OI, group_size)
        layer.qweight.copy_(q)
        layer.scales.copy_(s)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The float weight (out, in), made afresh: writing to it changes nothing."""
        if self.weights == "int8":
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}{group}"
