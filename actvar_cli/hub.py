"""The Hugging Face Hub: fetching official VAR weights and actvar models, publishing ours.

All traffic goes through ``huggingface_hub`` (so ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_OFFLINE`` and tokens behave as everywhere else); downloads land in the Hub cache
or ``--local-dir``, resume when interrupted, and come from the cache when offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import HubError

OFFICIAL_REPO = "FoundationVision/var"
OFFICIAL_FILES = {
    "d16": "var_d16.pth",
    "d20": "var_d20.pth",
    "d24": "var_d24.pth",
    "d30": "var_d30.pth",
    "d36": "var_d36.pth",
    "vae": "vae_ch160v4096z32.pth",
}
MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class DownloadTarget:
    repo_id: str
    filename: str | None  # None: the whole repository

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.filename}" if self.filename else self.repo_id


def parse_target(spec: str) -> DownloadTarget:
    """``d16`` .. ``d36``, ``vae``, ``REPO_ID`` or ``REPO_ID:FILE``."""
    key = spec.strip()
    if key.lower() in OFFICIAL_FILES:
        return DownloadTarget(OFFICIAL_REPO, OFFICIAL_FILES[key.lower()])
    if key.lower().removeprefix("var_") in OFFICIAL_FILES:
        return DownloadTarget(OFFICIAL_REPO, OFFICIAL_FILES[key.lower().removeprefix("var_")])
    repo, _, filename = key.partition(":")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise HubError(
            f"{spec!r} is not a model name or a repository id",
            "use d16, d20, d24, d30, d36, vae, USER/NAME or USER/NAME:FILE",
        )
    return DownloadTarget(repo, filename or None)


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str | None:
    """``HF_ENDPOINT`` as set now (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def cache_dir() -> str | None:
    """``HF_HUB_CACHE`` or ``HF_HOME``/hub as set now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _hub_error(e: Exception, target: DownloadTarget, revision: str | None) -> HubError:
    from huggingface_hub import errors as hf_errors

    rev = revision or "main"
    if isinstance(e, hf_errors.GatedRepoError):
        return HubError(f"{target.repo_id} is gated", "accept its terms on the Hub and log in (hf auth login)")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return HubError(f"repository {target.repo_id} was not found (or is private)", "check the name, or log in")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return HubError(f"revision {rev!r} does not exist in {target.repo_id}", "check --revision")
    if isinstance(e, hf_errors.LocalEntryNotFoundError):  # a subclass of EntryNotFoundError: test it first
        return HubError(
            f"{target} is not in the local cache and the Hub cannot be reached (offline)",
            "download it once with network access, or unset HF_HUB_OFFLINE",
        )
    if isinstance(e, hf_errors.EntryNotFoundError):
        return HubError(f"{target.filename} is not in {target.repo_id}@{rev}", "check the file name")
    if isinstance(e, hf_errors.HfHubHTTPError):
        return HubError(f"the Hub refused the request for {target}: {str(e).splitlines()[0]}")
    if isinstance(e, OSError):
        return HubError(f"could not fetch {target}: {e}", "check the network, disk space and --local-dir")
    return HubError(f"could not fetch {target}: {e}")


def download(
    spec: str,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    force: bool = False,
    offline: bool = False,
    tqdm_class=None,
) -> list[Path]:
    """Fetch one file (or a whole repository) and return the local paths."""
    import huggingface_hub as hf

    target = parse_target(spec)
    common = dict(
        revision=revision,
        endpoint=endpoint(),
        cache_dir=cache_dir(),
        local_dir=local_dir,
        force_download=force,
        local_files_only=offline or is_offline(),
        library_name="actvar",
        tqdm_class=tqdm_class,
    )
    try:
        if target.filename:
            return [Path(hf.hf_hub_download(target.repo_id, target.filename, **common))]
        root = Path(hf.snapshot_download(target.repo_id, **common))
    except Exception as e:
        raise _hub_error(e, target, revision) from e
    return sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)


def model_file_in(paths: list[Path]) -> Path | None:
    """The weights file among a downloaded repository's files."""
    for p in paths:
        if p.name == MODEL_FILE:
            return p
    weights = [p for p in paths if p.suffix in (".safetensors", ".pth")]
    return weights[0] if len(weights) == 1 else None
