"""Which layers of a VAR are quantized, quantizing a model in place, and reading quantized files.

Quantized: every linear layer of the transformer blocks (``attn.mat_qkv``, ``attn.proj``,
``ffn.fc1``, ``ffn.fc2``, ``ada_lin.1``) and the ``head``; they hold nearly all the weights. Kept
in float: routers and selectors (their choices must not hinge on rounding), embeddings, the head's
AdaLN and ``shared_ada_lin`` (small), and every bias.

A file stores ``X.qweight`` and ``X.scales`` in place of ``X.weight``, and the scheme in its
metadata under ``quantization``: ``{"weights": "int8" | "int4", "group_size": null | G}``, and
``"activations": "int8"`` where the blocks' layers also quantize their inputs (``w8a8``,
quant/linear.py). The head keeps float inputs even then: its logits are what sampling draws from,
and int8 inputs there cost the reference model 0.4-0.8 FID where the blocks' cost none (docs/memory.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from ..errors import CheckpointError, ConfigError
from .linear import DEFAULT_GROUP_SIZE, SCHEMES, QuantLinear, check_scheme, storage

QUANTIZABLE = re.compile(r"blocks\.\d+\.(attn\.mat_qkv|attn\.proj|ffn\.fc1|ffn\.fc2|ada_lin\.1)|head")
METADATA_KEY = "quantization"
QWEIGHT, SCALES = ".qweight", ".scales"


def is_quantizable(name: str, module: nn.Module) -> bool:
    return type(module) is nn.Linear and QUANTIZABLE.fullmatch(name) is not None


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if is_quantizable(n, m)]


def make_scheme(weights: str, group_size: int | None = DEFAULT_GROUP_SIZE, activations: str = "float") -> dict:
    check_scheme(weights, group_size, activations=activations)
    scheme = {"weights": weights, "group_size": group_size if weights == "int4" else None}
    return {**scheme, "activations": activations} if activations != "float" else scheme  # weight-only files as before


def activations_of(scheme: Mapping[str, Any]) -> str:
    return scheme.get("activations", "float")


def layer_activations(name: str, activations: str) -> str:
    """What one layer's inputs are under a scheme's ``activations``: the head's stay float."""
    return "float" if name == "head" else activations


def scheme_of(model: nn.Module) -> dict[str, Any] | None:
    """The model's scheme, read off its layers (None: not quantized)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return None
    acts = "int8" if any(m.activations == "int8" for m in layers) else "float"  # the head's are float
    return make_scheme(layers[0].weights, layers[0].group_size, acts)


def refuse_quantized(scheme: Mapping[str, Any] | None, name: str, hint: str) -> None:
    """Training and conversion need float weights: a quantized model is refused, in one line."""
    if scheme:
        weights = scheme["weights"]
        raise ConfigError(f"{name} is quantized ({weights}): it cannot be trained, converted or quantized again", hint)


def quantize_model(
    model: nn.Module, weights: str, group_size: int | None = DEFAULT_GROUP_SIZE, activations: str = "float"
) -> dict[str, Any]:
    """Replace every quantizable ``nn.Linear`` by a ``QuantLinear``, in place; returns the scheme.

    Every layer is checked before the first is replaced, so a bad group size leaves the model whole."""
    scheme = make_scheme(weights, group_size, activations)
    refuse_quantized(scheme_of(model), "the model", "quantize the float model it was made from")
    layers = quantizable_layers(model)
    for name, linear in layers:
        check_scheme(weights, scheme["group_size"], linear.in_features, name)
    for name, linear in layers:
        acts = layer_activations(name, activations)
        _replace(model, name, QuantLinear.from_linear(linear, weights, scheme["group_size"], acts))
    return scheme


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def read_scheme(meta: Mapping[str, str], source: str) -> dict[str, Any] | None:
    """The scheme a file's metadata records (None: a float file); anything malformed is refused."""
    if METADATA_KEY not in meta:
        return None
    try:
        stored = json.loads(meta[METADATA_KEY])
        if not isinstance(stored, dict) or stored.get("weights") not in SCHEMES:
            raise ValueError(f"weights must be one of {', '.join(SCHEMES)}")
        return make_scheme(stored["weights"], stored.get("group_size"), activations_of(stored))
    except (ValueError, ConfigError) as e:
        raise CheckpointError(f"{source}: its quantization metadata is invalid ({e})", "write the file again") from e


def file_scheme(source: str) -> dict[str, Any] | None:
    """The scheme a model file records, from its header alone (None: a float model, or not a
    safetensors file: reading it in full then says what it is)."""
    try:
        with safe_open(str(source), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # safetensors raises its own error types for files it cannot read
        return None
    return read_scheme(meta, str(source))


def logical_state_dict(sd: Mapping[str, torch.Tensor], scheme: Mapping[str, Any] | None, source: str) -> dict:
    """The state dict as the float model would have it, for reading its configuration off the
    shapes: each ``X.qweight`` and ``X.scales`` become an ``X.weight`` of the layer's (out, in)
    shape (on the meta device: nothing is dequantized). Dtypes and shapes are checked here."""
    if scheme is None:
        return dict(sd)
    logical = {}
    for key, t in sd.items():
        if key.endswith(SCALES) and key.removesuffix(SCALES) + QWEIGHT in sd:
            continue
        if not key.endswith(QWEIGHT):
            logical[key] = t
            continue
        base = key.removesuffix(QWEIGHT)
        logical[base + ".weight"] = torch.empty(_logical_shape(sd, base, scheme, source), device="meta")
    return logical


def _logical_shape(sd: Mapping[str, torch.Tensor], base: str, scheme: Mapping[str, Any], source: str):
    q, s = sd[base + QWEIGHT], sd.get(base + SCALES)
    if s is None or q.dim() != 2:
        raise CheckpointError(f"{source}: {base} has no scales or a qweight that is not a matrix", "write it again")
    out_features = q.shape[0]
    in_features = q.shape[1] * (2 if scheme["weights"] == "int4" else 1)
    group = scheme["group_size"]
    if scheme["weights"] == "int4" and in_features % group:
        raise CheckpointError(f"{source}: {base}'s input width {in_features} is not a multiple of group {group}")
    q_shape, q_dtype, s_shape = storage(scheme["weights"], out_features, in_features, group)
    if q.dtype != q_dtype or not s.is_floating_point() or tuple(s.shape) != s_shape:
        raise CheckpointError(
            f"{source}: {base} is not stored as {scheme['weights']} (qweight {q.dtype}, scales "
            f"{s.dtype} {tuple(s.shape)}; expected {q_dtype}, float {s_shape})",
            "write it again with `actvar quantize`",
        )
    return out_features, in_features


def install_quant_layers(model: nn.Module, sd: Mapping[str, torch.Tensor], scheme: Mapping[str, Any] | None) -> None:
    """Before loading a quantized file: an empty ``QuantLinear`` (on the model's device, e.g. meta)
    in place of each layer the file stores quantized, so that the file loads with strict keys."""
    if scheme is None:
        return
    for key in sorted(k for k in sd if k.endswith(QWEIGHT)):
        name = key.removesuffix(QWEIGHT)
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if linear is None or not is_quantizable(name, linear):
            raise CheckpointError(f"{key} is not a weight actvar quantizes", "write the file with `actvar quantize`")
        acts = layer_activations(name, activations_of(scheme))
        layer = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, weights=scheme["weights"],
                            group_size=scheme["group_size"], activations=acts, device=linear.weight.device)  # fmt: skip
        _replace(model, name, layer)


def weight_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
