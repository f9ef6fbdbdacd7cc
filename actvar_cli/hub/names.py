"""Names of models that are already on this machine: ``tiny``, paths, and downloaded Hub models.

Lookups never touch the network: a Hub name that is not in the cache is an error that says
which download to run.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ActvarError, CheckpointError
from ..models.config import BUILTIN_NAME
from .download import MODEL_FILE, OFFICIAL_FILES, download


def model_file_in(paths: list[Path]) -> Path | None:
    """The weights file among a downloaded repository's files."""
    for p in paths:
        if p.name == MODEL_FILE:
            return p
    weights = [p for p in paths if p.suffix in (".safetensors", ".pth")]
    return weights[0] if len(weights) == 1 else None


def resolve_local(spec: str) -> str:
    """A path, ``tiny``, or a model already downloaded (``d16``, ``vae``, ``USER/NAME``) as a path.

    Lookups of Hub names never touch the network: a name that is not cached is an error
    that says which download to run.
    """
    if spec == BUILTIN_NAME or Path(spec).exists():
        return spec
    repo_like = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    hub_like = spec.lower() in OFFICIAL_FILES or (repo_like and Path(spec).suffix not in (".pth", ".safetensors"))
    if not hub_like:
        return spec  # the loader says "no such file"
    try:
        paths = download(spec, offline=True)
    except ActvarError as e:
        raise CheckpointError(
            f"{spec} is neither a file nor a downloaded model", f"run `actvar download {spec}`"
        ) from e
    found = model_file_in(paths)
    if found is None:
        raise CheckpointError(f"no weights file among the downloaded files of {spec}")
    return str(found)
