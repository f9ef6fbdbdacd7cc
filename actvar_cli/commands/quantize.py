"""``actvar quantize``: a VAR or ActVAR model with int8 or int4 weights, in a file a quarter to an
eighth the size, that every command runs (quantized layers dequantize one at a time).

The file keeps what the model's file recorded (policy, base checkpoint, VQVAE) and adds where it
was quantized from; a dense model with no recorded base gets its float file as base, so that
``eval --teacher auto`` measures what quantization changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError
from ..files import check_output_file, sha256_file
from ..models.builtin import weights_path
from ..models.checkpoint import CheckpointInfo, save_model, user_metadata
from ..progress import Progress
from ..quant.apply import file_scheme, make_scheme, quantizable_layers, quantize_model, refuse_quantized
from ..quant.linear import DEFAULT_GROUP_SIZE
from .loading import load_models, resolve
from .result import Result


@dataclass
class QuantizeRequest:
    source: str
    output: Path
    weights: str = "int8"  # int8 | int4
    group_size: int | None = None  # int4 only (None: DEFAULT_GROUP_SIZE)
    activations: str = "float"  # float (weight-only) | int8 (per-token int8 inputs, int8 products)
    num_heads: int | None = None


@dataclass
class QuantizeResult(Result):
    output: str
    quantization: dict[str, Any]
    layers: int  # linear layers quantized
    parameters: int  # of the float model, as `inspect` counts them
    input_bytes: int
    output_bytes: int

    @property
    def bytes_per_parameter(self) -> float:
        """On disk: the output file's size over the float model's parameters."""
        return self.output_bytes / self.parameters

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "bytes_per_parameter": round(self.bytes_per_parameter, 4)}


def run(req: QuantizeRequest, progress: Progress | None = None) -> QuantizeResult:
    output = Path(req.output)
    source = resolve(req.source)
    check_output_file(output, (".safetensors",), (source,))
    if req.weights == "int8" and req.group_size is not None:
        raise ConfigError("--group-size is for int4", "int8 keeps one scale per output row: leave it out")
    group = DEFAULT_GROUP_SIZE if req.group_size is None else req.group_size
    scheme = make_scheme(req.weights, group, req.activations)  # a bad scheme fails before the model is read
    refuse_quantized(file_scheme(source), req.source, "quantize the float model it was made from")
    loaded = load_models(source, vae=False, num_heads=req.num_heads)
    model = loaded.model
    parameters = sum(p.numel() for p in model.parameters())
    layers = len(quantizable_layers(model))
    quantize_model(model, scheme["weights"], scheme["group_size"], req.activations)
    if progress:
        progress("quantize", layers, layers)
    save_model(model, output, _provenance(loaded.info, source))
    input_file = weights_path("var") if loaded.info.format == "builtin" else Path(source)
    return QuantizeResult(
        output=str(output),
        quantization=scheme,
        layers=layers,
        parameters=parameters,
        input_bytes=input_file.stat().st_size,
        output_bytes=output.stat().st_size,
    )


def _provenance(info: CheckpointInfo, source: str) -> dict[str, Any]:
    """The model's own metadata, and where its weights were quantized from."""
    builtin = info.format == "builtin"
    path = source if builtin else str(Path(source).resolve())
    sha = "" if builtin else sha256_file(source)
    meta: dict[str, Any] = {**user_metadata(info.metadata), "quantized_from": path, "quantized_from_sha256": sha}
    if info.kind == "var" and "base_checkpoint" not in meta:
        meta.update(base_checkpoint=info.name, base_checkpoint_path=path, base_sha256=sha)
    meta["actvar_version"] = __version__
    return meta
