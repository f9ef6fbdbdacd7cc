"""Shared test fixtures: the upstream parity fixture, tiny models, an isolated Hub home."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ACTVAR_SHARED", ROOT.parent / "shared"))
PARITY = SHARED / "fixtures" / "var-parity-d2"
SHAPES = SHARED / "fixtures" / "official-state-dict-shapes.json"
LABELS = [0, 7, 42, 999]

sys.path.insert(0, str(Path(__file__).parent))  # for fakehub

# never reach the network from tests: no telemetry, and a Hub home of our own
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "shared: needs the fixtures in ../shared (skipped when they are missing)")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Tests that need ../shared are skipped, not the whole session aborted, when it is missing."""
    if PARITY.exists() and SHAPES.exists():
        return
    skip = pytest.mark.skip(reason=f"shared fixtures not found at {SHARED} (set ACTVAR_SHARED)")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_hub(tmp_path_factory, monkeypatch):
    """Every test gets an empty HF_HOME and an endpoint that refuses connections."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("ACTVAR_CACHE", str(tmp_path_factory.getbasetemp() / "actvar-cache"))
    yield


@pytest.fixture(scope="session")
def ref():
    if not PARITY.exists():
        pytest.skip("parity fixture missing")
    with np.load(PARITY / "reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def d2():
    """(VAR, VQVAE) of the parity fixture."""
    if not PARITY.exists():
        pytest.skip("parity fixture missing")
    from actvar_cli.models.checkpoint import load_vae, load_var

    var, _ = load_var(PARITY / "var_d2.pth")
    vae, _ = load_vae(PARITY / "vae_ch32v4096z32.pth", var.cfg.patch_nums)
    return var, vae


@pytest.fixture(scope="session")
def tiny():
    from actvar_cli.models.checkpoint import load_vae, load_var

    var, _ = load_var("tiny")
    vae, _ = load_vae("tiny", var.cfg.patch_nums)
    return var, vae


@pytest.fixture
def run_cli():
    """Run ``actvar ARGS`` in-process; returns the click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from actvar_cli.cli import app

    runner = CliRunner()

    def run(*args: str, expect: int | None = 0):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        if expect is not None:
            shown = f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            assert result.exit_code == expect, shown
        return result

    return run


@pytest.fixture(scope="session")
def tiny_actvar(tmp_path_factory):
    """The tiny model converted by `actvar moefy` with the default policy (router and selector
    fitted on 4 self-generated images)."""
    from typer.testing import CliRunner

    from actvar_cli.cli import app

    path = tmp_path_factory.mktemp("moefy") / "tiny-actvar.safetensors"
    result = CliRunner().invoke(app, ["moefy", "tiny", "-o", str(path), "--calib-images", "4"])
    assert result.exit_code == 0, result.stderr
    return path


def distil(model, on_event=None, **job):
    """One distillation stage of ``model`` (a path or name) through the library, as the command runs it."""
    from actvar_cli.commands.distill import load_training_models
    from actvar_cli.train.distill import DistillJob, run_distillation

    return run_distillation(DistillJob(**job), load_training_models(str(model)), on_event)
