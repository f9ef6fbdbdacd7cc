"""The Hugging Face Hub: fetching official VAR weights and actvar models, publishing ours.

All traffic goes through ``huggingface_hub`` (so ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_OFFLINE`` and tokens behave as everywhere else); downloads land in the Hub cache
or ``--local-dir``, resume when interrupted, and come from the cache when offline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import HubError

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
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # the Hub's rules


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
    if not REPO_ID.fullmatch(repo) or ".." in repo or repo.endswith((".", "-")):
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


def hub_error(e: Exception, target: DownloadTarget, revision: str | None, action: str = "fetch") -> HubError:
    """huggingface_hub's typed errors as one line that says what to do; ``action`` is fetch or upload."""
    from huggingface_hub import errors as hf_errors

    rev = revision or "main"
    if isinstance(e, hf_errors.GatedRepoError):
        return HubError(f"{target.repo_id} is gated", "accept its terms on the Hub and log in (hf auth login)")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return HubError(f"repository {target.repo_id} was not found (or is private)", "check the name, or log in")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return HubError(f"revision {rev!r} does not exist in {target.repo_id}", "check --revision")
    if isinstance(e, hf_errors.LocalEntryNotFoundError):  # a subclass of EntryNotFoundError: test it first
        if is_offline():
            return HubError(f"{target} is not in the local cache, and HF_HUB_OFFLINE is set", "unset it to download")
        return HubError(f"{target} is not in the local cache", f"run `actvar download {target}` with network access")
    if isinstance(e, hf_errors.EntryNotFoundError):
        return HubError(f"{target.filename} is not in {target.repo_id}@{rev}", "check the file name")
    if isinstance(e, hf_errors.HfHubHTTPError):
        return HubError(
            f"the Hub refused to {action} {target}: {str(e).splitlines()[0]}", "check the name and your token"
        )
    if isinstance(e, OSError):
        return HubError(f"could not {action} {target}: {e}", "check the network, disk space and --local-dir")
    return HubError(f"could not {action} {target}: {e}")


def check_reachable(url: str | None, timeout: float = 5.0) -> None:
    """Fail at once, not after half a minute of retries, when the Hub's host refuses connections."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return  # a proxy decides what is reachable
    parsed = urlparse(url or "https://huggingface.co")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise HubError(
            f"cannot reach the Hub at {parsed.scheme}://{parsed.netloc} ({reason})",
            "check the network and HF_ENDPOINT, or use --offline for files already in the cache",
        ) from e


@contextlib.contextmanager
def quiet_retries():
    """huggingface_hub logs every retry as a warning; the final error says what went wrong."""
    hf_logger = logging.getLogger("huggingface_hub")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logger.setLevel(level)


def download(
    spec: str,
    *,
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
    if not common["local_files_only"]:
        check_reachable(endpoint())
    try:
        with quiet_retries():
            if target.filename:
                return [Path(hf.hf_hub_download(target.repo_id, target.filename, **common))]
            root = Path(hf.snapshot_download(target.repo_id, **common))
    except Exception as e:
        raise hub_error(e, target, revision) from e
    return sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)
