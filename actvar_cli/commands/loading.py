"""Names become models, once: a checkpoint, its VQVAE and its teacher, checked and on a device.

Every command that takes a model goes through ``load_models``. A name (a path, ``tiny``, an
official name or a Hub repository in the cache) is resolved once; the file is read once; and
every check is made here: a VAR (not a VQVAE) where a VAR is expected, a VQVAE that fits it,
and a teacher that is the very model the student was made from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ActvarError, CheckpointError, ConfigError
from ..hub.names import resolve_local
from ..models.checkpoint import (
    CheckpointInfo,
    build_var_from_state_dict,
    check_pair,
    load_vae,
    load_var,
    read_checkpoint,
    require_var,
    source_id,
)
from ..models.config import BUILTIN_NAME
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..runtime import CPU, Runtime

AUTO = "auto"  # --teacher auto: the base checkpoint the model records


@dataclass
class Loaded:
    """A model with its VQVAE and teacher (when asked for), and where each came from."""

    model: VAR
    info: CheckpointInfo
    source: str  # a path, or tiny
    vae: VQVAE | None = None
    vae_source: str | None = None
    teacher: VAR | None = None
    teacher_source: str | None = None

    @property
    def model_id(self) -> str:
        return source_id(self.source)

    @property
    def vae_id(self) -> str:
        return source_id(self.vae_source)

    @property
    def teacher_id(self) -> str:
        return source_id(self.teacher_source)


def resolve(name: str) -> str:
    """A path, ``tiny``, or a model already downloaded (``d16``, ``vae``, ``USER/NAME``) as a path."""
    return resolve_local(name)


def load_models(
    model: str,
    *,
    vae: str | None | bool = None,
    teacher: str | None = None,
    runtime: Runtime = CPU,
    num_heads: int | None = None,
    actvar: bool = False,
    sparse: bool = False,
) -> Loaded:
    """Load ``model`` and, as asked, its VQVAE and teacher onto ``runtime.device``.

    ``vae``: a name, None (the one the model records, else the cached official one) or False
    (no VQVAE). ``teacher``: a name, ``auto`` (the base the model records) or None (none).
    ``actvar``: the model must be an ActVAR model; ``sparse``: it must be made cheaper than a dense
    VAR (a sparsity policy: an ActVAR model, another method's or a stack's file; or quantized weights).
    """
    source = resolve(model)
    sd, info = read_checkpoint(source, num_heads)
    require_var(info)
    if actvar and info.kind != "actvar":
        raise ConfigError(
            f"{model} has no experts, routers or selectors (not an ActVAR model)",
            "convert it with `actvar moefy` and a policy that prunes tokens or experts",
        )
    if sparse and info.policy is None and info.quantization is None:
        raise ConfigError(
            f"{model} is the dense VAR as it is (no sparsity policy, no quantized weights)",
            "make a cheaper model with `actvar moefy` or `actvar quantize`",
        )
    loaded = Loaded(build_var_from_state_dict(sd, info), info, source)
    if vae is not False:
        loaded.vae_source = find_vae(info.metadata, vae or None)
        loaded.vae = vae_for(loaded.model, loaded.vae_source, runtime)
    if teacher:
        loaded.teacher_source = find_teacher(info.metadata, None if teacher == AUTO else teacher)
        loaded.teacher, _ = load_var(loaded.teacher_source)
        check_made_from(loaded.info, loaded.model, loaded.teacher, loaded.teacher_source)
    for m in (loaded.model, loaded.vae, loaded.teacher):
        if m is not None:
            m.to(runtime.device)
    return loaded


def vae_for(model: VAR, source: str, runtime: Runtime = CPU) -> VQVAE:
    """The VQVAE at ``source`` (a path or tiny), checked to fit ``model``, on the runtime's device."""
    vae, _ = load_vae(source, model.cfg.patch_nums)
    check_pair(model.cfg, vae)
    return vae.to(runtime.device)


def find_vae(metadata: Mapping[str, str], explicit: str | None) -> str:
    """``explicit``, else the VQVAE a model records (tiny records its own), else the official one
    from the Hub cache."""
    if explicit:
        return resolve(explicit)
    stored = metadata.get("vae")
    if stored and (stored == BUILTIN_NAME or Path(stored).exists()):
        return stored
    try:
        return resolve("vae")
    except ActvarError as e:
        raise ConfigError("no VQVAE given", "pass --vae vae_ch160v4096z32.pth (or run `actvar download vae`)") from e


def find_teacher(metadata: Mapping[str, str], explicit: str | None) -> str:
    """``explicit``, else the base checkpoint an ActVAR model names: its path, or its official
    name in the Hub cache."""
    if explicit:
        return resolve(explicit)
    path = metadata.get("base_checkpoint_path")
    official = metadata.get("base_checkpoint", "").removesuffix(".pth").removeprefix("var_")
    if path and (path == BUILTIN_NAME or Path(path).exists()):
        return path
    if official:
        return resolve(official)
    raise ConfigError("the model names no base checkpoint to use as teacher", "pass --teacher var_d16.pth")


def recorded_base_id(metadata: Mapping[str, str]) -> str | None:
    """The identity of the dense model an ActVAR model was made from, as it recorded it."""
    if metadata.get("base_checkpoint_path") == BUILTIN_NAME:
        return source_id(BUILTIN_NAME)
    return metadata.get("base_sha256") or None


def check_made_from(info: CheckpointInfo, student: VAR, teacher: VAR, teacher_source: str) -> None:
    """The teacher (or dense base) must be the model the student was made from: the same
    architecture, and the very file whose sha256 the student recorded."""
    if teacher.cfg != student.cfg.dense:
        raise ConfigError(f"{teacher_source} does not have the architecture of {info.name}")
    recorded = recorded_base_id(info.metadata)
    actual = source_id(teacher_source)
    if recorded and actual != recorded:
        raise CheckpointError(
            f"{teacher_source} is not the base model {info.name} was made from (sha256 {actual[:12]}…, "
            f"the model records {recorded[:12]}…)",
            "pass the dense model it was converted from",
        )
