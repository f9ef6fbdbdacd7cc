"""A distillation run's folder, which knows the run it holds.

``run.json`` records what made the run (model, teacher and VAE hashes, stage, recipe, batch,
steps). A fresh run refuses a folder that holds another run's files unless told to
overwrite them; ``--resume`` refuses a folder whose run differs from the one asked for,
and continues from the newest checkpoint that loads, falling back past a damaged one.
Checkpoints hold no pickles that could run code: weights in safetensors, the optimizer
state read back with ``weights_only=True``, the rest in JSON.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, OutputError
from ..files import atomic_write_text, atomic_write_with
from ..models.checkpoint import read_state_dict, save_safetensors

RUN_FILE = "run.json"
CHECKPOINT_NAME = re.compile(r"step_(\d{6,})")
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"  # written last: a checkpoint without it is incomplete
RUN_OUTPUTS = (RUN_FILE, METRICS_FILE, CHECKPOINTS, "model.safetensors", "training.json")
RUNTIME_KEYS = ("checkpoint_every", "keep_checkpoints", "precision")  # may change when resuming


def run_identity(job, ids: dict[str, str], global_batch: int, total: int, data: str) -> dict[str, Any]:
    """What must be the same for a resumed run to continue this one (``ids``: sha256 or builtin:NAME)."""
    recipe = {k: v for k, v in job.recipe.to_dict().items() if k not in RUNTIME_KEYS}
    return {
        "stage": job.stage,
        "model_sha256": ids["model"],
        "teacher_sha256": ids["teacher"],
        "vae_sha256": ids["vae"],
        "data": data,
        "recipe": recipe,
        "global_batch": global_batch,
        "total_steps": total,
    }


class RunFolder:
    def __init__(self, root: Path, main: bool):
        self.root = Path(root)
        self.main = main  # only the main process writes
        self.checkpoints = self.root / CHECKPOINTS

    def _make(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create {self.root}: {e.strerror}", "choose a writable --out-dir") from e

    def check_free(self, overwrite: bool) -> list[str]:
        """The run outputs already here; refuse them unless ``overwrite``. Every process checks
        before any process writes (``start``)."""
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"--out-dir {self.root} is a file", "give a folder")
        found = [name for name in RUN_OUTPUTS if (self.root / name).exists()]
        if found and not overwrite:
            raise OutputError(
                f"{self.root} holds another run's files ({', '.join(found)})",
                "continue it with --resume, choose another --out-dir, or pass --overwrite to discard them",
            )
        return found

    def start(self, identity: dict[str, Any], found: list[str]) -> None:
        """Take the folder for a fresh run (main process): discard ``found``, record the run."""
        if self.main:
            self._make()
            for name in found:
                path = self.root / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            atomic_write_text(self.root / RUN_FILE, json.dumps(identity, indent=1))

    def resume(self, identity: dict[str, Any], model: torch.nn.Module, optimizer) -> int:
        """Load the newest checkpoint that loads into ``model`` and ``optimizer``; return its step."""
        run_file = self.root / RUN_FILE
        if not run_file.exists():
            raise ConfigError(f"--resume: {self.root} holds no run (no {RUN_FILE})", "start it without --resume")
        try:
            recorded = json.loads(run_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--resume: {run_file} is unreadable", "start the run again in a new --out-dir") from e
        differ = sorted(k for k in set(identity) | set(recorded) if identity.get(k) != recorded.get(k))
        if differ:
            raise ConfigError(
                f"--resume: {self.root} holds another run (it differs in {', '.join(differ)})",
                "resume with the same model, teacher, VAE, data and recipe, or start a new --out-dir",
            )
        for step, path in self._complete_checkpoints():
            try:
                self._load(path, model, optimizer)
            except (CheckpointError, RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError):
                continue  # damaged (a crash while writing it?): fall back to the one before
            if self.main:
                self._trim_metrics(step)
            return step
        raise ConfigError(f"--resume: no complete checkpoint under {self.checkpoints}", "start it without --resume")

    def _complete_checkpoints(self) -> list[tuple[int, Path]]:
        """Our own checkpoint folders (``step_NNNNNN``) with their state file, newest first; a user's
        ``step_000004_backup/`` or anything else in the folder is not ours and is left alone."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for d in self.checkpoints.iterdir():
            m = CHECKPOINT_NAME.fullmatch(d.name)
            if m and d.is_dir() and (d / STATE_FILE).exists():
                found.append((int(m.group(1)), d))
        return sorted(found, reverse=True)

    @staticmethod
    def _load(path: Path, model: torch.nn.Module, optimizer) -> None:

        sd, _, _ = read_state_dict(path / "model.safetensors")
        model.load_state_dict(sd, strict=True)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))

    def save_checkpoint(self, step: int, model: torch.nn.Module, optimizer, keep: int) -> None:
        if not self.main:
            return
        d = self.checkpoints / f"step_{step:06d}"
        d.mkdir(parents=True, exist_ok=True)
        save_safetensors(model.state_dict(), d / "model.safetensors", {})
        atomic_write_with(d / "optimizer.pt", lambda tmp: torch.save(optimizer.state_dict(), tmp))
        atomic_write_text(d / STATE_FILE, json.dumps({"step": step}))
        for _, old in self._complete_checkpoints()[keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.root / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _trim_metrics(self, step: int) -> None:
        """Drop the records of steps after the checkpoint a run resumes from."""
        path = self.root / METRICS_FILE
        if path.exists():
            kept = [ln for ln in path.read_text(errors="replace").splitlines() if _step_of(ln) <= step]
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _step_of(line: str) -> float:
    """The step a metrics line records; a torn line (a run killed while writing it) never survives."""
    try:
        record = json.loads(line)
        return record["step"] if isinstance(record, dict) and isinstance(record.get("step"), int) else math.inf
    except ValueError:
        return math.inf
