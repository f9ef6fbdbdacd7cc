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

int8 activations (``w8a8``): an int8 layer may also quantize its input, one scale per token (row),
and multiply int8 by int8 into int32 (``torch._int_mm``: VNNI on x86 CPUs, tensor cores on CUDA).
That is where quantization saves time, not only memory: on this CPU, at 1024 rows of width 256,
the product with its quantize and rescale steps takes 0.8 ms where ``F.linear`` takes 1.4
(``scripts/int8_kernel.py``). Below about 64 rows the steps around the product cost what it saves.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

SCHEMES = ("int8", "int4")
ACTIVATIONS = ("float", "int8")  # float: weight-only; int8: int8 activations per token, int8 products
DEFAULT_GROUP_SIZE = 128
INT8_MAX = 127
INT4_MAX = 7  # symmetric: -7..7, stored as 1..15
INT4_OFFSET = 8
CUDA_MIN_ROWS = 16  # CUDA's int8 product takes more rows than this, and widths divisible by 8


def check_scheme(
    weights: str, group_size: int | None, in_features: int | None = None, name: str = "", activations: str = "float"
) -> None:
    """A known scheme, and for int4 an even group size that divides the layer's input width."""
    if weights not in SCHEMES:
        raise ConfigError(f"unknown weight format {weights!r}", "use --weights int8 or --weights int4")
    if activations not in ACTIVATIONS:
        raise ConfigError(f"unknown activation format {activations!r}", "use --activations float or int8")
    if activations == "int8" and weights != "int8":
        raise ConfigError(f"int8 activations need int8 weights (got {weights})", "use --weights int8")
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


def linear_int8_dynamic(
    x: torch.Tensor, q_OI: torch.Tensor, scales_O: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear`` with x quantized to int8 on the fly (symmetric, one scale per row) and an
    int8 x int8 -> int32 product, rescaled by the row's and the output channel's scales."""
    x_TI = x.reshape(-1, x.shape[-1])
    T, n_out = x_TI.shape[0], q_OI.shape[0]
    if x_TI.device.type not in ("cpu", "cuda") or (x_TI.device.type == "cuda" and (x_TI.shape[1] % 8 or n_out % 8)):
        return F.linear(x, dequantize_int8(q_OI, scales_O).to(x.dtype), bias)  # no int8 product here
    # a (T, 1) operand is expanded first: broadcast as it is, the CPU kernel runs ten times slower
    s_T1 = x_TI.abs().amax(-1, keepdim=True).float().clamp_min_(1e-12).div_(INT8_MAX)
    xq_TI = torch.div(x_TI.float(), s_T1.expand(T, x_TI.shape[1])).round_().to(torch.int8)
    if x_TI.device.type == "cuda" and T <= CUDA_MIN_ROWS:  # zero rows: integer sums are exact, rows stay as they were
        xq_TI = F.pad(xq_TI, (0, 0, 0, CUDA_MIN_ROWS + 1 - T))
    out_TO = torch._int_mm(xq_TI, q_OI.t())[:T].float()
    out_TO.mul_(s_T1.expand(T, n_out)).mul_(scales_O)
    if bias is not None:
        out_TO.add_(bias)
    return out_TO.to(x.dtype).view(*x.shape[:-1], n_out)


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
        activations: str = "float",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_scheme(weights, group_size, in_features, activations=activations)
        self.in_features, self.out_features = in_features, out_features
        self.weights, self.activations = weights, activations
        self.group_size = group_size if weights == "int4" else None
        q_shape, q_dtype, s_shape = storage(weights, out_features, in_features, self.group_size)
        self.register_buffer("qweight", torch.empty(q_shape, dtype=q_dtype, device=device))
        self.register_buffer("scales", torch.empty(s_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weights: str, group_size: int | None = DEFAULT_GROUP_SIZE, activations: str = "float"
    ) -> QuantLinear:
        w_OI = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weights=weights,
                    group_size=group_size, activations=activations, device=w_OI.device)  # fmt: skip
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

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: another bias than the layer's own (attention's q/k/v biases on ``mat_qkv``)."""
        bias = self.bias if bias is None else bias
        if self.activations == "int8":
            return linear_int8_dynamic(x, self.qweight, self.scales, bias)
        return F.linear(x, self.weight, bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        acts = ", activations=int8" if self.activations == "int8" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}{group}{acts}"
