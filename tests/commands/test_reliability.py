"""Reliability round 3: settings that must not be lost, outputs that must not be passed off as this
run's, and hostile or broken inputs that must get one line and exit code 2 (not a traceback, a hang
or a huge allocation)."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from actvar_cli.files import FolderLock, atomic_write_text
from actvar_cli.generation.jobs import claimed_folder
from actvar_cli.models.checkpoint import read_state_dict, save_safetensors


def one_line_error(r, *words):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], r.stderr


def hostile_copy(tiny_actvar, tmp_path, name="bad.safetensors", drop=(), add=None, meta=None):
    """The converted tiny model with tensors dropped or added and metadata replaced."""
    sd, m, _ = read_state_dict(tiny_actvar)
    sd = {k: v for k, v in sd.items() if k not in drop} | (add or {})
    path = tmp_path / name
    save_safetensors(sd, path, {**m, **(meta or {})})
    return path


# -- settings silently lost or poisoned --------------------------------------------------------


@pytest.mark.slow
def test_set_pairs_are_kept_under_flags_that_were_not_given(run_cli, tiny_actvar, tmp_path):
    out = tmp_path / "run"
    args = ["--out-dir", out, "--max-steps", "1", "--batch-size", "4", "--set", "global_batch=4"]
    run_cli("distill-stage1", tiny_actvar, *args, "--set", "seed=7", "--set", "stage1_lr=0.5")
    recipe = json.loads((out / "run.json").read_text())["recipe"]
    assert recipe["seed"] == 7 and recipe["stage1_lr"] == 0.5
    run_cli("distill-stage1", tiny_actvar, *args, "--set", "seed=7", "--seed", "3", "--overwrite")
    assert json.loads((out / "run.json").read_text())["recipe"]["seed"] == 3  # a flag given wins


@pytest.mark.parametrize(
    "args",
    [["--alpha", "nan"], ["--lr", "inf"], ["--set", "beta=.nan"], ["--set", "weight_decay=-.inf"], ["--beta", "-1"]],
)
def test_non_finite_or_negative_hyperparameters_are_refused(run_cli, tiny_actvar, tmp_path, args):
    r = run_cli("distill-stage1", tiny_actvar, "--out-dir", tmp_path / "run", *args, expect=2)
    one_line_error(r)
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize(
    "pair, words",
    [
        ("scales=abc", "scales"),
        ("teacher_top_p=abc", "teacher_top_p"),
        ("keep_checkpoints=1.5", "keep_checkpoints"),
        ("token_rates=[0.5, x]", "token_rates"),
        ("seed=-3", "seed"),
    ],
)
def test_bad_set_values_are_one_line_before_training(run_cli, tiny_actvar, tmp_path, pair, words):
    one_line_error(run_cli("distill-stage1", tiny_actvar, "--out-dir", tmp_path / "r", "--set", pair, expect=2), words)


def test_recipes_that_are_bombs_or_devices_are_refused(run_cli, tiny_actvar, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    rows = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    rows += [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    bomb.write_text("\n".join(rows) + "\nseed: *i\n")
    r = run_cli("distill-stage1", tiny_actvar, "--out-dir", tmp_path / "r", "--config", bomb, expect=2)
    one_line_error(r, "aliases")
    r = run_cli("moefy", "tiny", "-o", tmp_path / "m.safetensors", "--config", "/dev/zero", expect=2)
    one_line_error(r, "regular file")


# -- another run's results overwritten or passed off as this run's -----------------------------


def test_push_does_not_replace_another_models_file(run_cli, tiny_actvar, tmp_path):
    other = tmp_path / "other.safetensors"
    run_cli("moefy", "tiny", "-o", other, "--calib-images", "0", "--seed", "1")
    folder = tmp_path / "card"
    run_cli("push", other, "--repo", "me/a", "--dry-run", folder)
    one_line_error(run_cli("push", tiny_actvar, "--repo", "me/a", "--dry-run", folder, expect=2), "another model")
    assert (folder / "model.safetensors").read_bytes() == other.read_bytes()
    run_cli("push", tiny_actvar, "--repo", "me/a", "--dry-run", folder, "--overwrite")
    assert (folder / "model.safetensors").read_bytes() == tiny_actvar.read_bytes()


def test_push_refuses_an_eval_json_of_the_wrong_shape(run_cli, tiny_actvar, tmp_path):
    bad = tmp_path / "eval.json"
    bad.write_text("[1, 2, 3]")
    args = ("push", tiny_actvar, "--repo", "me/a", "--dry-run", tmp_path / "c", "--eval", bad)
    one_line_error(run_cli(*args, expect=2), "not an eval.json")
    bad.write_text(json.dumps({"fid": "low", "token_agreement": 0.9}))
    run_cli(*args)  # values that are not numbers are left out of the card
    assert "0.9" in (tmp_path / "c" / "README.md").read_text()


def test_an_eval_folder_belongs_to_one_model(run_cli, tiny_actvar, tmp_path):
    out = tmp_path / "e"
    run_cli("eval", "tiny", "--teacher", "tiny", "--num", "2", "--batch-size", "2", "--out", out)
    r = run_cli("eval", tiny_actvar, "--teacher", "auto", "--num", "2", "--batch-size", "2", "--out", out, expect=2)
    one_line_error(r, "another model")
    run_cli("eval", tiny_actvar, "--teacher", "auto", "--num", "2", "--batch-size", "2", "--out", out, "--overwrite")
    assert json.loads((out / "eval.json").read_text())["kind"] == "actvar"


def test_a_run_that_fails_before_any_image_gives_the_folder_back(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError), claimed_folder(out, {"labels": [0], "seed": 0}, overwrite=False):
        assert (out / "samples.json").exists()
        raise RuntimeError("the run failed")
    assert not (out / "samples.json").exists()


def test_a_rerun_with_fewer_images_is_refused(run_cli, tmp_path):
    out = tmp_path / "s"
    run_cli("sample", "tiny", "--out", out, "--classes", "0-3", "--batch-size", "4")
    r = run_cli("sample", "tiny", "--out", out, "--classes", "0-1", "--batch-size", "4", expect=2)
    one_line_error(r, "another run")


def test_a_folder_in_use_is_refused_with_the_holder(run_cli, tiny_actvar, tmp_path):
    out = tmp_path / "run"
    with FolderLock(out):
        r = run_cli("distill-stage1", tiny_actvar, "--out-dir", out, "--max-steps", "1", expect=2)
        one_line_error(r, "in use by process", str(os.getpid()))
        one_line_error(run_cli("sample", "tiny", "--out", out, expect=2), "in use")
    with FolderLock(out):  # released: it can be taken again
        pass


def test_the_same_weights_make_the_same_file(tmp_path):
    code = (
        "import sys, torch; from actvar_cli.models.checkpoint import save_safetensors;"
        "t = {f'w{i}': torch.full((3,), float(i)) for i in range(20)};"
        "save_safetensors(t, sys.argv[1], {f'k{i}': {'v': i} for i in range(20)})"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{seed}.safetensors")], check=True, env=env)
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_killed_writes_are_cleaned_and_outputs_follow_the_umask(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".x.json.{dead.stdout.strip()}-abc.partial"
    stale.write_text("half")
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    assert not stale.exists()
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640


def test_a_full_disk_is_one_line(run_cli, tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    one_line_error(run_cli("random-weights", "tiny", "-o", tmp_path / "w.safetensors", expect=2), "No space left")


# -- hostile or broken inputs ------------------------------------------------------------------


def test_a_block_numbered_a_billion_is_refused_at_once(run_cli, tiny_actvar, tmp_path):
    bad = hostile_copy(tiny_actvar, tmp_path, add={"blocks.999999999.attn.proj.bias": torch.zeros(256)})
    one_line_error(run_cli("inspect", bad, expect=2), "not 0..N-1")


@pytest.mark.parametrize(
    "meta, words",
    [
        ({"var_config": json.dumps({"depth": "six"})}, "configuration"),
        ({"var_config": json.dumps({"depth": 6, "embed_dim": 256, "num_heads": 4, "norm_eps": -1})}, "configuration"),
        ({"var_config": "[1, 2]"}, "configuration"),
        ({"policy": json.dumps({"scales": [6, 7]})}, "policy"),
        ({"policy": json.dumps({"scales": [60], "token_rates": [0.5], "weight_rates": [0.5]})}, "policy"),
        ({"policy": json.dumps({"scales": [7], "token_rates": [1.5], "weight_rates": [0.5]})}, "policy"),
    ],
)
def test_file_metadata_is_checked_before_anything_is_built(run_cli, tiny_actvar, tmp_path, meta, words):
    one_line_error(run_cli("inspect", hostile_copy(tiny_actvar, tmp_path, meta=meta), expect=2), words)


@pytest.mark.slow
def test_resume_after_a_torn_metrics_line_and_beside_a_users_backup(tiny_actvar, tmp_path):
    from test_hardening import tiny_job, train

    out = tmp_path / "run"
    train(tiny_job(tiny_actvar, out, max_steps=4))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed while writing a line
    (out / "checkpoints" / "step_000004_backup").mkdir()
    summary = train(tiny_job(tiny_actvar, out, resume=True, max_steps=4))
    assert summary["resumed_from_step"] == 4
    assert all(json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize(
    "args, words",
    [
        (["eval", "tiny", "--fid", "--ref", "shapes", "--num", "1000000000"], "too many"),
        (["sample", "tiny", "--out", "{tmp}/s", "--classes", "0-999999999"], "more than"),
        (["bench", "--arch", "tiny", "--batch-size", "1000000"], "memory"),
        (["eval", "tiny", "--fid", "--ref", "shapes", "--num", "8", "--out", "{long}"], ""),
        (["sample", "[/bold]x", "--out", "{tmp}/s"], "[/bold]x"),
    ],
)
def test_sizes_names_and_markup_from_users(run_cli, tmp_path, args, words):
    filled = [a.format(tmp=tmp_path, long=tmp_path / ("x" * 300)) for a in args]
    one_line_error(run_cli(*filled, expect=2), words)


def test_the_metrics_cache_is_checked_before_sampling(run_cli, tmp_path, monkeypatch):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ACTVAR_CACHE", str(blocker))
    r = run_cli("eval", "tiny", "--fid", "--ref", "shapes", "--num", "4", "--out", tmp_path / "e", expect=2)
    one_line_error(r, "cache")
    assert not (tmp_path / "e" / "samples").exists()


def test_inspect_prints_no_terminal_escapes_from_a_file(run_cli, tiny_actvar, tmp_path):
    bad = hostile_copy(tiny_actvar, tmp_path, meta={"note": "\x1b]0;pwned\x07\x1b[31mred"})
    r = run_cli("inspect", bad)
    assert "\x1b]0" not in r.stdout and "\x07" not in r.stdout


def npz_claiming(path, shape):
    """An .npz whose arr_0 header claims ``shape`` over a few bytes of data."""
    with zipfile.ZipFile(path, "w") as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        f.write(b"\0" * 64)


def make_ref(folder, sizes):
    folder.mkdir()
    for i, s in enumerate(sizes):
        Image.fromarray(np.zeros((s, s, 3), np.uint8)).save(folder / f"{i}.png")
    return folder


def test_reference_images_are_checked_before_sampling(run_cli, tmp_path):
    refs = {
        "mixed": make_ref(tmp_path / "mixed", [32, 32, 16]),
        "one": make_ref(tmp_path / "one", [32]),
        "huge": tmp_path / "huge.npz",
        "empty": tmp_path / "empty.npz",
        "loop": tmp_path / "loop",
    }
    npz_claiming(refs["huge"], (10**12, 32, 32, 3))
    np.savez(refs["empty"], arr_0=np.zeros((0, 32, 32, 3), np.uint8))
    refs["loop"].mkdir()
    (refs["loop"] / "a.png").symlink_to(refs["loop"] / "b.png")
    (refs["loop"] / "b.png").symlink_to(refs["loop"] / "a.png")
    bomb = make_ref(tmp_path / "bomb", [32, 32])
    Image.new("L", (20000, 20000)).save(bomb / "2.png")
    refs["bomb"] = bomb
    for name, ref in refs.items():
        r = run_cli("eval", "tiny", "--fid", "--ref", ref, "--num", "4", "--out", tmp_path / f"e-{name}", expect=2)
        one_line_error(r)
        assert not (tmp_path / f"e-{name}" / "samples").exists(), name


@pytest.mark.parametrize(
    "fault",
    ["negative", "too large", "floats", "misshapen", "labels out of range", "labels misshapen"],
)
def test_a_broken_token_cache_is_refused(run_cli, tiny_actvar, tmp_path, fault):
    from actvar_cli.commands.loading import load_models
    from actvar_cli.train.data import CACHE_FORMAT

    loaded = load_models("tiny")
    cache = tmp_path / "cache"
    cache.mkdir()
    tokens, labels = np.zeros((4, 155), np.int16), np.zeros(4, np.int64)
    if fault == "negative":
        tokens[0, 0] = -1
    elif fault == "too large":
        tokens[1, 2] = 1024
    elif fault == "floats":
        tokens = tokens.astype(np.float32)
    elif fault == "misshapen":
        tokens = tokens[:, :100]
    elif fault == "labels out of range":
        labels[2] = 10
    else:
        labels = labels[:3]
    np.save(cache / "tokens.npy", tokens)
    np.save(cache / "labels.npy", labels)
    meta = {"format": CACHE_FORMAT, "patch_nums": [1, 2, 3, 4, 5, 6, 8], "vae_sha256": loaded.vae_id}
    (cache / "meta.json").write_text(json.dumps(meta))
    args = ("--out-dir", tmp_path / "r", "--data", cache, "--max-steps", "1")
    r = run_cli("distill-stage1", tiny_actvar, *args, expect=2)
    one_line_error(r, str(cache))


def test_compare_refuses_a_method_named_twice_before_any_work(run_cli):
    one_line_error(run_cli("compare", "tiny", "--methods", "fastvar:0.5,fastvar:0.5", expect=2), "more than once")


def test_flops_of_the_reference_model_by_name_or_architecture(run_cli):
    by_arch = json.loads(run_cli("flops", "--arch", "tiny", "--json").stdout)
    by_name = json.loads(run_cli("flops", "tiny", "--json").stdout)
    assert by_arch["policy"]["scales"] == [6, 7] and by_name["dense_flops"] == by_arch["dense_flops"]


def test_every_one_line_error_still_has_its_traceback_under_debug(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "actvar_cli", "--debug", "sample", "tiny", "--out", tmp_path / "s", "--top-p", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr


# -- round 4: what a probe of the new commands found ---------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["tune", "tiny", "--ref", "shapes", "--out", "t.safetensors", "--batch-size", "0"], ["--batch-size 0"]),
        (["tune", "tiny", "--ref", "shapes", "--out", "t.safetensors", "--num", "1"], ["--num 1", "two samples"]),
        (["tune", "tiny", "--ref", "shapes", "--out", "t.safetensors", "--max-fid-ratio", "inf"], ["inf"]),
        (["tune", "tiny", "--ref", "shapes", "--out", "t.safetensors", "--candidates", "gone.safetensors"], ["gone"]),
        (["eval", "tiny", "--fid", "--ref", "shapes", "--num", "1"], ["--num 1", "at least 2"]),
        (["flops", "tiny", "--method", "actvar:gone.safetensors"], ["names a model file"]),
        (["memory", "--arch", "tiny", "--method", "actvar:gone.safetensors"], ["names a model file"]),
        (["memory", "--arch", "tiny", "--shard", "3"], ["--train"]),
        (["quantize", "tiny", "--weights", "int8", "--group-size", "7", "-o", "q.safetensors"], ["int4"]),
        (["distill-stage2", "tiny", "--out-dir", "s2", "--set", "stage2_cfg="], ["no value"]),
    ],
)
def test_new_commands_refuse_bad_values_before_any_work(run_cli, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    r = run_cli(*args, expect=2)
    one_line_error(r, *words)
    assert r.stderr.startswith("error:"), repr(r.stderr)  # no blank line from a progress bar that never ran
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_emoji_codes_in_user_text_are_shown_as_written(run_cli):
    r = run_cli("flops", "tiny", "--method", "fastvar:-1", expect=2)
    one_line_error(r, "fastvar:-1")
    r = run_cli("inspect", "a:thumbsup:b.safetensors", expect=2)
    one_line_error(r, "a:thumbsup:b.safetensors")
