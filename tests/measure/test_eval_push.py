"""`eval` (teacher agreement, FID / IS / PRC with a test-made Inception), `push`, and the way back."""

import json

import numpy as np
import pytest
import torch
from fakehub import FakeHub, free_port
from PIL import Image

from actvar_cli.measure.fidelity import INCEPTION_FILE


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights: built without any download."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    class Skeleton(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    original = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        model = Skeleton("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        fe.load_state_dict_from_url = original
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_eval_against_the_teacher(run_cli, tiny_actvar, tmp_path):
    r = run_cli(
        "eval", tiny_actvar, "--teacher", "auto", "--num", "4", "--batch-size", "4", "--out", tmp_path, "--json"
    )
    res = json.loads(r.stdout)
    assert res["teacher"] == "tiny"
    assert 0 <= res["token_agreement"] <= 1 and res["logit_kl"] > 0 and res["psnr_db"] > 0
    sparse = [s for s in res["per_scale"] if s["sparse"]]
    assert [s["scale"] for s in sparse] == [6, 7]  # the reference model's last two scales
    assert res["token_agreement"] == pytest.approx(np.mean([s["token_agreement"] for s in sparse]))
    dense_scales = [s for s in res["per_scale"] if not s["sparse"]]
    assert all(s["token_agreement"] == 1.0 and s["logit_kl"] < 1e-6 for s in dense_scales)
    assert 0 < res["flops"]["savings"] < 1
    assert json.loads((tmp_path / "eval.json").read_text())["logit_kl"] == pytest.approx(res["logit_kl"])
    dense = json.loads(run_cli("eval", tiny_actvar, "--teacher", "auto", "--num", "4", "--dense", "--psnr-images", "2",
                               "--out", tmp_path / "d", "--json").stdout)  # fmt: skip
    assert dense["token_agreement"] == 1.0 and dense["logit_kl"] < 1e-6 and dense["psnr_db"] > 60


@pytest.mark.slow
def test_fid_is_prc_against_a_folder_and_an_adm_batch(run_cli, tiny_actvar, inception_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTVAR_CACHE", str(tmp_path / "actvar-cache"))
    rng = np.random.default_rng(0)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    arr = rng.integers(0, 255, size=(12, 64, 64, 3), dtype=np.uint8)
    for i, img in enumerate(arr):
        Image.fromarray(img).save(ref_dir / f"{i}.png")
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=arr)
    args = ["--classes", "0-3", "--num", "12", "--batch-size", "6", "--inception-weights", inception_weights]
    for ref in (ref_dir, tmp_path / "VIRTUAL_ref.npz"):
        out = tmp_path / f"eval-{ref.stem}"
        r = run_cli("eval", tiny_actvar, "--vae", "tiny", "--fid", "--is", "--prc", "--ref", ref, *args, "--out", out,
                    "--json")  # fmt: skip
        res = json.loads(r.stdout)
        assert np.isfinite(res["fid"]) and res["fid"] > 0 and res["inception_score"] > 0
        assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
        with np.load(out / "samples" / "samples.npz") as z:
            assert z["arr_0"].shape == (12, 32, 32, 3)
    cached = sorted(p.name for p in (tmp_path / "actvar-cache" / "fidelity").iterdir())
    assert len(cached) == 2 and all(name.endswith(".npz") for name in cached)  # reference features, no pickles
    assert not (ref_dir / ".actvar-fidelity-cache").exists()


def test_fid_without_inception_weights_is_a_clear_error(run_cli, tiny_actvar, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("ACTVAR_INCEPTION_WEIGHTS", raising=False)
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ref / name)
    r = run_cli("eval", tiny_actvar, "--vae", "tiny", "--fid", "--ref", ref, "--classes", "0", "--num", "2",
                "--out", tmp_path / "o", expect=2)  # fmt: skip
    assert INCEPTION_FILE in r.stderr and "--inception-weights" in r.stderr
    r = run_cli("eval", tiny_actvar, "--vae", "tiny", "--fid", "--out", tmp_path / "o", expect=2)
    assert "--fid and --prc need reference images" in r.stderr


def test_push_dry_run_writes_model_config_and_card(run_cli, tiny_actvar, tmp_path):
    (tiny_actvar.parent / "eval.json").write_text(json.dumps({"fid": 3.5, "token_agreement": 0.9}))
    run_cli("push", tiny_actvar, "--repo", "me/actvar-tiny", "--dry-run", tmp_path / "card")
    files = sorted(p.name for p in (tmp_path / "card").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "card" / "README.md").read_text()
    header = card.split("---")[1]
    assert "base_model: FoundationVision/var" in header and "library_name: actvar" in header and "actvar" in header
    assert "| 6 | 0.75 | 0.75 |" in card and "saved" in card and "| fid | 3.5 |" in card
    assert "actvar download me/actvar-tiny" in card
    config = json.loads((tmp_path / "card" / "config.json").read_text())
    assert config["experts"] == 16 and config["policy"]["scales"] == [6, 7]


@pytest.mark.slow
def test_push_to_the_hub_then_download_and_sample(run_cli, tiny_actvar, tmp_path, monkeypatch):
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        run_cli("push", tiny_actvar, "--repo", "me/actvar-tiny", "--private")
        repo = hub.repos["me/actvar-tiny"]
        assert repo.private and set(repo.files) == {"README.md", "config.json", "model.safetensors"}
        assert repo.files["model.safetensors"] == tiny_actvar.read_bytes()
        paths = json.loads(run_cli("download", "me/actvar-tiny", "--json").stdout)["me/actvar-tiny"]
        assert any(p.endswith("model.safetensors") for p in paths)
        run_cli("sample", "me/actvar-tiny", "--vae", "tiny", "--classes", "3", "--out", tmp_path / "s")
        assert len(list((tmp_path / "s").glob("0*.png"))) == 1
        report = json.loads(run_cli("inspect", "me/actvar-tiny", "--json", "--no-hash").stdout)
        assert report["kind"] == "actvar"


@pytest.mark.shared
def test_push_refuses_a_dense_model(run_cli, tmp_path):
    from conftest import PARITY

    r = run_cli("push", PARITY / "var_d2.pth", "--repo", "me/x", "--dry-run", tmp_path, expect=2)
    assert "made no cheaper" in r.stderr


@pytest.mark.slow
def test_eval_sampling_is_sharded_over_accelerate_processes(tiny_actvar, inception_weights, tmp_path):
    """Two processes each make half of the images; rank 0 gathers them and scores."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(np.random.default_rng(1).integers(0, 255, size=(6, 48, 48, 3), dtype=np.uint8)):
        Image.fromarray(img).save(ref / f"{i}.png")
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "actvar_cli", "eval", str(tiny_actvar), "--vae", "tiny",
        "--fid", "--is", "--ref", str(ref), "--classes", "0-2", "--num", "6", "--batch-size", "2",
        "--inception-weights", str(inception_weights), "--out", str(tmp_path / "eval"), "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert res["sampling"]["processes"] == 2 and res["sampling"]["images"] == 6
    assert np.isfinite(res["fid"]) and res["inception_score"] > 0
    assert len(list((tmp_path / "eval" / "samples").glob("0*.png"))) == 6
