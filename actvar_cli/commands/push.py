"""``actvar push``: publish an ActVAR model (weights, config.json, a model card) on the Hub."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..hub.download import parse_target
from ..hub.publish import check_folder_free, find_eval_json, upload_folder, write_push_folder
from ..models.checkpoint import read_checkpoint
from .result import Result


@dataclass
class PushRequest:
    model: Path
    repo: str
    private: bool = False
    dry_run: Path | None = None  # write the folder here instead of uploading
    eval_json: Path | None = None  # None: an eval.json beside the model, if any
    token: str | None = None
    overwrite: bool = False  # replace another model's files in the dry-run folder


@dataclass
class PushResult(Result):
    repo: str
    url: str | None = None
    folder: str | None = None
    files: list[str] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if v is not None}


def run(req: PushRequest) -> PushResult:
    """Check everything, then write the folder (``dry_run``) or upload it."""
    parse_target(req.repo)
    _, info = read_checkpoint(req.model)
    if info.policy is None and info.quantization is None:
        raise ConfigError(
            f"{req.model} is a dense VAR, made no cheaper", "push what moefy, quantize or distillation wrote"
        )
    evals = find_eval_json(req.model, req.eval_json)
    if req.dry_run:
        check_folder_free(Path(req.dry_run), req.model, req.overwrite)
        folder = write_push_folder(req.model, info, repo_id=req.repo, folder=req.dry_run, evals=evals)
        return PushResult(req.repo, folder=str(folder), files=sorted(p.name for p in folder.iterdir()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_push_folder(req.model, info, repo_id=req.repo, folder=tmp, evals=evals)
        return PushResult(req.repo, url=upload_folder(folder, req.repo, private=req.private, token=req.token))
