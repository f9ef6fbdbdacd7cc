"""Nothing runs from a planted file, nothing stale passes for new, no input is destroyed, and every
bad value gets one line and exit code 2 before any work."""

import json
import pickle

import numpy as np
import pytest
from conftest import distil

from actvar_cli.errors import CheckpointError, ConfigError, OutputError
from actvar_cli.models.checkpoint import load_var, read_state_dict, save_model, user_metadata
from actvar_cli.train.recipes import load_recipe


class Payload:
    """Creates ``marker`` if anyone ever unpickles it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(Payload(marker), f)


def tiny_job(model, out, **kw):
    recipe = load_recipe("tiny").override(global_batch=4, checkpoint_every=2)
    return model, dict(stage=1, out_dir=out, recipe=recipe, batch_size=4, **{"max_steps": 3, **kw})


# -- no code runs from a file that a run reads back ----------------------------------------


@pytest.mark.slow
def test_resume_never_unpickles_what_it_finds_in_a_run_folder(tiny_actvar, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    train(tiny_job(tiny_actvar, out, max_steps=4))
    newest = sorted((out / "checkpoints").iterdir())[-1]
    plant(newest / "custom_checkpoint_0.pkl", marker)  # Accelerate would unpickle this on load_state
    plant(newest / "optimizer.pt", marker)  # a planted optimizer state: refused, the previous checkpoint used
    summary = train(tiny_job(tiny_actvar, out, resume=True, max_steps=4))
    assert not marker.exists()
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4


@pytest.mark.slow
def test_eval_reads_no_cache_that_it_did_not_write(run_cli, tiny_actvar, tmp_path, monkeypatch):
    from actvar_cli.measure.fidelity import ShapesReference, cache_path, yardstick_for

    marker = tmp_path / "pwned"
    monkeypatch.setenv("ACTVAR_CACHE", str(tmp_path / "cache"))
    planted = cache_path("shapes", ShapesReference(), yardstick_for("shapes", None))
    planted.parent.mkdir(parents=True)
    np.savez(planted, features=np.array([Payload(marker)], dtype=object))  # a pickle where our features go
    plant(tmp_path / ".actvar-fidelity-cache" / "shapes-actvar-shapes-features-features.pt", marker)  # torch-fidelity's
    r = run_cli("eval", tiny_actvar, "--fid", "--ref", "shapes", "--num", "10", "--out", tmp_path / "e", "--json")
    assert np.isfinite(json.loads(r.stdout)["fid"]) and not marker.exists()
    with np.load(planted, allow_pickle=False) as z:  # replaced by plain arrays
        assert z["features"].dtype == np.float64


# -- nothing stale passes for new, and no input is destroyed -------------------------------------


@pytest.mark.slow
def test_a_fresh_run_refuses_a_folder_that_holds_another_run(tiny_actvar, tmp_path):
    out = tmp_path / "run"
    train(tiny_job(tiny_actvar, out, max_steps=2))
    with pytest.raises(OutputError, match="holds another run's files"):
        train(tiny_job(tiny_actvar, out, max_steps=2))
    assert train(tiny_job(tiny_actvar, out, max_steps=2, overwrite=True))["steps"] == 2


@pytest.mark.slow
def test_resume_refuses_another_model_of_the_same_architecture(tiny_actvar, tmp_path):
    other = tmp_path / "other.safetensors"
    model, info = load_var(tiny_actvar)
    model.blocks[0].selector.bias.data += 1
    save_model(model, other, user_metadata(info.metadata))
    train(tiny_job(tiny_actvar, tmp_path / "run", max_steps=2))
    with pytest.raises(ConfigError, match="differs in model_sha256"):
        train(tiny_job(other, tmp_path / "run", max_steps=3, resume=True))


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny_actvar, tmp_path):
    out = tmp_path / "run"
    train(tiny_job(tiny_actvar, out, max_steps=4))  # checkpoints at steps 2 and 4
    latest = out / "checkpoints" / "step_000004" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])
    summary = train(tiny_job(tiny_actvar, out, max_steps=4, resume=True))
    assert summary["resumed_from_step"] == 2


def test_no_command_writes_over_its_input(run_cli, tiny_actvar, tmp_path):
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(tiny_actvar.read_bytes())
    r = run_cli("distill-stage2", copy, "--out-dir", tmp_path, "--max-steps", "1", expect=2)
    assert "is also an input" in r.stderr and copy.read_bytes() == tiny_actvar.read_bytes()
    dense = tmp_path / "dense.safetensors"
    run_cli("random-weights", "tiny", "-o", dense)
    before = dense.read_bytes()
    r = run_cli("moefy", dense, "-o", dense, expect=2)
    assert "is also an input" in r.stderr and dense.read_bytes() == before


def test_the_base_model_is_checked_by_its_hash(run_cli, tmp_path):
    base = tmp_path / "base.safetensors"
    run_cli("random-weights", "tiny", "-o", base, "--seed", "1")
    run_cli("moefy", base, "-o", tmp_path / "a.safetensors", "--calib-images", "0")
    run_cli("random-weights", "tiny", "-o", base, "--seed", "2")  # another model under the same name
    r = run_cli(
        "eval",
        tmp_path / "a.safetensors",
        "--teacher",
        "auto",
        "--vae",
        "tiny",
        "--num",
        "2",
        "--out",
        tmp_path / "e",
        expect=2,
    )
    assert "is not the base model" in r.stderr


def test_nan_weights_are_refused(tiny_actvar, tmp_path):
    sd, meta, _ = read_state_dict(tiny_actvar)
    sd["head.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="NaN or infinite values"):
        load_var(bad)


def test_a_float_reference_batch_is_refused_before_sampling(run_cli, tiny_actvar, tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=np.random.rand(4, 32, 32, 3).astype(np.float32))
    r = run_cli("eval", tiny_actvar, "--fid", "--ref", tmp_path / "ref.npz", "--out", tmp_path / "e", expect=2)
    assert "not uint8 images" in r.stderr and not (tmp_path / "e").exists()


def test_a_token_cache_made_with_another_vae_is_refused(tiny_actvar, tmp_path):
    cache = tmp_path / "tokens"
    cache.mkdir()
    np.save(cache / "tokens.npy", np.zeros((2, 155), np.int16))
    np.save(cache / "labels.npy", np.zeros(2, np.int64))
    meta = {"format": "actvar-token-cache", "patch_nums": [1, 2, 3, 4, 5, 6, 8], "vae_sha256": "0" * 64}
    (cache / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="encoded with another VQVAE"):
        train(tiny_job(tiny_actvar, tmp_path / "run", data=str(cache)))


# -- every bad value gets one line and exit code 2, before any work -----------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "tiny", "--out", "{tmp}/s", "--top-p", "1.5"], "--top-p 1.5"),
        (["sample", "tiny", "--out", "{tmp}/s", "--top-k", "-5"], "--top-k -5"),
        (["sample", "tiny", "--out", "{tmp}/s", "--classes", "1,,2"], "not a list of integers"),
        (["sample", "tiny", "--out", "{tmp}/s", "--cfg", "-1"], "--cfg -1"),
        (["sample", "tiny", "--out", "{tmp}/s", "--num-per-class", "0"], "must be at least 1"),
        (["distill-stage1", "{model}", "--out-dir", "{tmp}/d", "--epochs", "-1"], "--epochs -1.0"),
        (["distill-stage1", "{model}", "--out-dir", "{tmp}/d", "--set", "betas=0.9"], "betas = 0.9"),
        (["distill-stage1", "{model}", "--out-dir", "{tmp}/d", "--checkpoint-every", "0"], "checkpoint_every = 0"),
        (["distill-stage1", "{model}", "--out-dir", "{tmp}/d", "--set", "lr"], "not KEY=VALUE"),
        (["bench", "--arch", "tiny", "--repeats", "0"], "--repeats 0"),
        (["bench", "--arch", "d99"], "unknown architecture"),
        (["bench", "--arch", "tiny", "--by-scale", "--plot", "{tmp}/s.jpg"], "the plot is a .png file"),
        (["bench", "--arch", "tiny", "--plot", "{tmp}/s.png"], "add --by-scale"),
        (["flops", "--arch", "d16", "--token-rates", "0.5,0.6,0.7"], "2 sparse scales but 3 token rates"),
        (["moefy", "tiny", "-o", "{tmp}"], "is a folder"),
        (["moefy", "tiny", "-o", "{tmp}/m.safetensors", "--experts", "1"], "need at least 2 experts"),
        (["push", "{model}", "--repo", "me/my model", "--dry-run", "{tmp}/p"], "not a model name or a repository id"),
        (["eval", "{model}", "--teacher", "auto", "--num", "0"], "--num 0"),
        (["eval", "{model}", "--fid", "--ref", "{tmp}/nowhere"], "neither an image folder nor an .npz"),
        (["compare", "tiny", "--methods", "fastvar:2"], "fastvar:2"),
        (["compare", "tiny", "--methods", "nonsense"], "unknown method"),
        (["random-weights", "d16", "-o", "{tmp}/x.txt"], "must end in"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(run_cli, tiny_actvar, tmp_path, args, message):
    filled = [a.format(tmp=tmp_path, model=tiny_actvar) for a in args]
    r = run_cli(*filled, expect=2)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_an_unreachable_hub_fails_fast_with_the_right_words(run_cli, monkeypatch):
    import time

    t0 = time.perf_counter()
    r = run_cli("download", "d16", expect=2)  # HF_ENDPOINT points at a port where nothing listens
    assert time.perf_counter() - t0 < 10
    assert "cannot reach the Hub" in r.stderr and "HF_HUB_OFFLINE" not in r.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in run_cli("download", "d16", expect=2).stderr


def test_a_failed_upload_says_upload(run_cli, tiny_actvar):
    r = run_cli("push", tiny_actvar, "--repo", "me/actvar-tiny", expect=2)  # nothing listens
    assert "cannot reach the Hub" in r.stderr
    from fakehub import FakeHub

    with FakeHub() as hub:
        hub.fail_uploads = True
        import os

        os.environ["HF_ENDPOINT"] = hub.url
        r = run_cli("push", tiny_actvar, "--repo", "me/actvar-tiny", "--token", "hf_x", expect=2)
    assert "upload" in r.stderr and "fetch" not in r.stderr


def train(job):
    model, kw = job
    return distil(model, **kw)
