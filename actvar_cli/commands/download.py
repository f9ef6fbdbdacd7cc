"""``actvar download``: official VAR weights, or any Hub model, into the Hub cache or a folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..hub.download import download, parse_target
from .result import Result


@dataclass
class DownloadRequest:
    names: list[str]  # d16 … d36, vae, REPO_ID or REPO_ID:FILE
    revision: str | None = None
    local_dir: Path | None = None
    force: bool = False
    offline: bool = False


@dataclass
class DownloadResult(Result):
    files: dict[str, list[str]]  # name -> local paths

    def to_dict(self) -> dict[str, list[str]]:
        return dict(self.files)


def run(req: DownloadRequest) -> DownloadResult:
    """Every name checked first, then each downloaded."""
    for name in req.names:
        parse_target(name)
    files = {}
    for name in req.names:
        paths = download(name, revision=req.revision, local_dir=req.local_dir, force=req.force, offline=req.offline)
        files[name] = [str(p) for p in paths]
    return DownloadResult(files)
