"""Reading and writing checkpoints: official ``.pth`` state dicts and our ``.safetensors``.

Loading never unpickles arbitrary objects (``torch.load(weights_only=True)``); writing goes
through ``files.atomic_write_with``, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointError, ConfigError
from ..files import atomic_write_with, sha256_file
from ..quant.apply import METADATA_KEY, install_quant_layers, logical_state_dict, read_scheme, scheme_of
from ..sparsity.policy import SparsityPolicy
from .builtin import BUILTIN_NAME, builtin_state_dict
from .config import (
    PATCH_NUMS_256,
    VAEConfig,
    VARConfig,
    infer_vae_config,
    infer_var_config,
    looks_like_vae,
    looks_like_var,
)
from .var import VAR, derived_buffers
from .vqvae import VQVAE

FORMAT_NAME = "actvar"
FORMAT_VERSION = "1"
FORMAT_KEYS = ("format", "format_version", "kind", "var_config", "vae_config", "policy", METADATA_KEY)  # save_model's
DOWNLOAD_HINT = "check the path, or fetch official weights with `actvar download d16`"


@dataclass
class CheckpointInfo:
    """What a checkpoint is, as ``inspect`` reports it."""

    source: str
    kind: str  # "var", "actvar" or "vqvae"
    format: str  # "pth", "safetensors" or "builtin"
    metadata: dict[str, Any] = field(default_factory=dict)
    var_config: VARConfig | None = None
    vae_config: VAEConfig | None = None
    policy: SparsityPolicy | None = None
    quantization: dict[str, Any] | None = None  # {"weights": "int8" | "int4", "group_size": ...}; None: float

    @property
    def name(self) -> str:
        return self.source if self.format == "builtin" else Path(self.source).name


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # some tools wrap state dicts one level deep: {"state_dict": {...}} or {"model": {...}}
    if isinstance(obj, Mapping) and len(obj) == 1:
        ((key, inner),) = obj.items()
        if key in ("state_dict", "model", "module") and isinstance(inner, Mapping):
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} holds no state dict", "give a VAR or VQVAE weights file")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a plain state dict (entry {bad[0]!r} is not a tensor)")
    return dict(obj)


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    def load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = load(mmap=False)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} contains Python objects, not only tensors; refusing to unpickle it",
                "save a plain state dict (torch.save(model.state_dict(), ...)) or a .safetensors file",
            ) from e
        raise CheckpointError(f"{path} is not a PyTorch checkpoint", DOWNLOAD_HINT) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupt (not a readable PyTorch checkpoint)",
            "download it again, e.g. `actvar download d16 --force`",
        ) from e
    return _unwrap(obj, path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError and OSError subclasses
        raise CheckpointError(
            f"{path} is truncated or corrupt (not a readable safetensors file)",
            "write it again (an interrupted copy?)",
        ) from e
    if not sd:
        raise CheckpointError(f"{path} holds no tensors")
    return sd, meta


def file_format(path: Path) -> str:
    """``pth`` (a zip or legacy pickle written by torch.save) or ``safetensors``, from the first bytes."""
    with path.open("rb") as f:
        head = f.read(8)
    if path.suffix != ".safetensors" and (head[:2] == b"PK" or head[:1] == b"\x80"):
        return "pth"
    if path.suffix != ".safetensors" and len(head) == 8 and int.from_bytes(head, "little") > path.stat().st_size:
        raise CheckpointError(
            f"{path} is not a checkpoint (neither PyTorch nor safetensors)",
            "give a VAR or VQVAE weights file (.pth or .safetensors)",
        )
    return "safetensors"


def read_state_dict(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(state dict, safetensors metadata or {}, format) of a file."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"no such file: {path}", DOWNLOAD_HINT)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file", "name the .pth or .safetensors file in it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty", "download or write it again")
    fmt = file_format(path)
    if fmt == "pth":
        return _read_pth(path), {}, fmt
    sd, meta = _read_safetensors(path)
    return sd, meta, fmt


def source_id(source: str | os.PathLike) -> str:
    """What identifies a model's weights: the file's sha256, or ``builtin:NAME``."""
    return f"builtin:{source}" if str(source) == BUILTIN_NAME else sha256_file(source)


def _metadata_json(meta: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key]) if key in meta else None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"metadata entry {key!r} is not valid JSON") from e


def user_metadata(meta: Mapping[str, str]) -> dict[str, str]:
    """A file's metadata without the entries ``save_model`` writes itself (format, config, policy)."""
    return {k: v for k, v in meta.items() if k not in FORMAT_KEYS}


def describe(
    sd: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    source: str,
    fmt: str,
    num_heads: int | None = None,
) -> CheckpointInfo:
    """Classify a state dict and infer its configuration.

    Nothing in a file is trusted: the configuration is read off the tensors (bounded by what they
    hold), and a stored configuration or policy must agree with them before anything is built. A
    quantized file's layers are read at their float shapes."""
    scheme = read_scheme(meta, source)
    shapes = logical_state_dict(sd, scheme, source)
    keys = set(shapes)
    if looks_like_var(keys):
        cfg = _var_config(shapes, meta, source, num_heads)
        return CheckpointInfo(source, "actvar" if cfg.num_experts else "var", fmt, dict(meta), var_config=cfg,
                              policy=_policy(meta, cfg, source), quantization=scheme)  # fmt: skip
    if looks_like_vae(keys):
        try:
            vae_cfg = vae_config_of(sd, meta, None)
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise CheckpointError(f"{source}: cannot read its VQVAE configuration ({e})") from e
        return CheckpointInfo(source, "vqvae", fmt, dict(meta), vae_config=vae_cfg)
    raise CheckpointError(
        f"{source} is neither a VAR nor a VQVAE checkpoint (unrecognised keys, e.g. {sorted(keys)[0]!r})",
        "give an official var_dXX.pth / vae_ch160v4096z32.pth or a file written by actvar",
    )


def _var_config(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], source: str, num_heads: int | None):
    try:
        stored = _metadata_json(meta, "var_config")
        if not stored:
            return infer_var_config(sd, num_heads=num_heads)
        if not isinstance(stored, dict):
            raise TypeError("var_config is not a mapping")
        cfg = VARConfig.from_dict(stored)
        if num_heads is not None and num_heads != cfg.num_heads:
            raise ConfigError(f"--num-heads {num_heads} contradicts the stored config ({cfg.num_heads} heads)")
        inferred = infer_var_config(sd, num_heads=cfg.num_heads, patch_nums=cfg.patch_nums)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"{source}: cannot read its configuration ({e})", "write the file again") from e
    if inferred.replace(vae_stride=cfg.vae_stride, norm_eps=cfg.norm_eps) != cfg:  # neither shows in tensors
        raise CheckpointError(f"{source}: stored config does not match its tensors")
    return cfg


def _policy(meta: Mapping[str, str], cfg: VARConfig, source: str) -> SparsityPolicy | None:
    stored = _metadata_json(meta, "policy")
    if not stored:
        return SparsityPolicy(scales=_last_two(cfg)) if cfg.num_experts else None
    try:
        if not isinstance(stored, dict):
            raise TypeError("the policy is not a mapping")
        policy = SparsityPolicy.from_dict(stored)
        policy.validate_for(cfg)
    except (TypeError, ValueError, KeyError, ConfigError) as e:
        raise CheckpointError(f"{source}: its stored sparsity policy is invalid ({e})") from e
    return policy


def _last_two(cfg: VARConfig) -> tuple[int, ...]:
    n = len(cfg.patch_nums)
    return (n - 1, n)


def vae_config_of(
    sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], patch_nums: tuple[int, ...] | None
) -> VAEConfig:
    """Read off the tensors; what they cannot show (GroupNorm groups, phi ratio) comes from the
    stored config, else upstream's defaults. The patch layout is the VAR's (None: the stored one)."""
    stored = _metadata_json(meta, "vae_config")
    if patch_nums is None:
        patch_nums = tuple(stored["patch_nums"]) if stored and "patch_nums" in stored else PATCH_NUMS_256
    inferred = infer_vae_config(sd, patch_nums)
    if not stored:
        return inferred
    cfg = VAEConfig.from_dict({**stored, "patch_nums": tuple(patch_nums)})
    if inferred != dataclasses.replace(cfg, norm_groups=inferred.norm_groups, quant_resi=inferred.quant_resi):
        raise CheckpointError("the stored VQVAE config does not match its tensors")
    return cfg


def read_checkpoint(source: str | os.PathLike, num_heads: int | None = None):
    """(state dict, CheckpointInfo) of a VAR or VQVAE file, or of the built-in ``tiny``."""
    if str(source) == BUILTIN_NAME:
        sd, meta = builtin_state_dict("var")
        return sd, describe(sd, {**meta, "vae": BUILTIN_NAME}, BUILTIN_NAME, "builtin", num_heads)
    sd, meta, fmt = read_state_dict(source)
    return sd, describe(sd, meta, str(source), fmt, num_heads)


def _load_into(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    sd = dict(sd)
    for name, buf in derived_buffers(module.cfg).items():  # accepted when present, rebuilt when absent
        sd.setdefault(name, buf)
    for name, _ in module.named_buffers():
        if name.endswith("zero_k_bias"):
            sd.setdefault(name, torch.zeros(module.cfg.embed_dim))
    try:
        module.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"{source} does not match the inferred architecture: {detail}") from e


def check_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """NaN or infinite weights would generate images with no word of warning: refuse them."""
    for key, t in sd.items():
        if t.is_floating_point() and not key.endswith("attn_bias_for_masking") and not torch.isfinite(t).all():
            raise CheckpointError(
                f"{source} holds NaN or infinite values (first in {key})", "the file is damaged, or training diverged"
            )


def build_var_from_state_dict(sd: Mapping[str, torch.Tensor], info: CheckpointInfo) -> VAR:
    check_finite(sd, info.source)
    with torch.device("meta"):
        model = VAR(info.var_config)
    install_quant_layers(model, sd, info.quantization)
    _load_into(model, sd, info.source)
    model.float()
    model.policy = info.policy
    return model.eval().requires_grad_(False)


def build_vae_from_state_dict(sd: Mapping[str, torch.Tensor], info: CheckpointInfo) -> VQVAE:
    check_finite(sd, info.source)
    with torch.device("meta"):
        vae = VQVAE(info.vae_config)
    try:
        vae.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{info.source} does not match the inferred VQVAE architecture") from e
    return vae.float().eval().requires_grad_(False)


def load_var(source: str | os.PathLike, num_heads: int | None = None) -> tuple[VAR, CheckpointInfo]:
    """A VAR or ActVAR model (eval mode, no grad) from a file or ``tiny``."""
    sd, info = read_checkpoint(source, num_heads)
    require_var(info)
    return build_var_from_state_dict(sd, info), info


def require_var(info: CheckpointInfo) -> None:
    if info.kind == "vqvae":
        raise CheckpointError(
            f"{info.source} is a VQVAE checkpoint, not a VAR model",
            "pass it with --vae, and give a VAR (e.g. var_d16.pth) as the model",
        )


def load_vae(source: str | os.PathLike, patch_nums: tuple[int, ...] | None = None) -> tuple[VQVAE, CheckpointInfo]:
    """The VQVAE from a file or ``tiny``; ``patch_nums`` comes from the VAR it will serve (by
    default the layout stored with the VQVAE, else upstream's 256-px one)."""
    if str(source) == BUILTIN_NAME:
        (sd, meta), fmt = builtin_state_dict("vae"), "builtin"
    else:
        sd, meta, fmt = read_state_dict(source)
    info = describe(sd, meta, str(source), fmt)
    if info.kind != "vqvae":
        raise CheckpointError(
            f"{source} is a VAR model, not a VQVAE",
            "give the VAE (e.g. vae_ch160v4096z32.pth) with --vae",
        )
    info.vae_config = vae_config_of(sd, meta, tuple(patch_nums) if patch_nums else None)
    return build_vae_from_state_dict(sd, info), info


def check_pair(var_cfg: VARConfig, vae: VQVAE) -> None:
    """A VAR and a VAE work together only with the same vocabulary and code width."""
    if vae.cfg.vocab_size != var_cfg.vocab_size or vae.cfg.z_channels != var_cfg.vae_dim:
        raise ConfigError(
            f"the VAE (vocabulary {vae.cfg.vocab_size}, codes {vae.cfg.z_channels}) does not fit the VAR "
            f"(vocabulary {var_cfg.vocab_size}, codes {var_cfg.vae_dim})",
            "use the VAE the model was trained with",
        )


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], target: str | os.PathLike, metadata: Mapping[str, Any]
) -> None:
    """Write tensors with string metadata (non-strings are stored as JSON), atomically.

    The same tensors and metadata always give the same bytes (tensors and metadata keys in sorted
    order), so a file's sha256 identifies its content: the safetensors library writes metadata in a
    random order, which would make two saves of the same weights look like two models.
    """
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in sorted(metadata.items())}
    plain = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
    atomic_write_with(target, lambda tmp: _write_safetensors(tmp, plain, meta))


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors layout: an 8-byte little-endian header size, the JSON header, then the data."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot hold")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_metadata(model: VAR, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": "actvar" if model.is_actvar else "var",
        "var_config": model.cfg.to_dict(),
    }
    if model.policy is not None:
        meta["policy"] = model.policy.to_dict()
    scheme = scheme_of(model)  # read off its layers, so it cannot go stale
    if scheme is not None:
        meta[METADATA_KEY] = scheme
    meta.update(extra or {})
    return meta


def save_model(model: VAR, target: str | os.PathLike, extra_metadata: Mapping[str, Any] | None = None) -> None:
    save_safetensors(model.state_dict(), target, model_metadata(model, extra_metadata))


def stored_json(info: CheckpointInfo, key: str) -> Any:
    return _metadata_json(info.metadata, key)
