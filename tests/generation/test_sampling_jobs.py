"""`actvar sample` reproduces upstream, and image i is always made in the same canonical batch."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import LABELS, PARITY

from actvar_cli.errors import OutputError
from actvar_cli.generation.images import load_png, png_name
from actvar_cli.generation.jobs import SampleJob, job_record, prepare_out_dir, run_sample_job
from actvar_cli.generation.sampling import SamplingOptions
from actvar_cli.runtime import CPU

pytestmark = pytest.mark.shared  # uses ../shared/fixtures

VAR = PARITY / "var_d2.pth"
VAE = PARITY / "vae_ch32v4096z32.pth"


def ref_uint8(ref, key):
    return (ref[key] * 255 + 0.5).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.mark.slow
def test_greedy_sample_reproduces_fixture(run_cli, ref, tmp_path):
    out = tmp_path / "greedy"
    run_cli(
        "sample", VAR, "--vae", VAE, "--top-k", "1", "--cfg", "1.5", "--classes", "0,7,42,999", "--npz", "--out", out
    )  # fmt: skip
    with np.load(out / "samples.npz") as z:
        arr = z["arr_0"]
    assert arr.shape == (4, 256, 256, 3) and arr.dtype == np.uint8
    diff = np.abs(arr.astype(int) - ref_uint8(ref, "greedy_cfg1.5_img").astype(int))
    assert diff.max() <= 1  # float32 noise may move a value across a rounding boundary
    names = sorted(p.name for p in out.glob("0*.png"))
    assert names == [png_name(i, c) for i, c in enumerate(LABELS)]
    assert (out / "grid.png").exists()


@pytest.mark.slow
def test_upstream_seeding_reproduces_seeded_fixture(run_cli, ref, tmp_path):
    out = tmp_path / "seeded"
    run_cli(
        "sample", VAR, "--vae", VAE, "--classes", "0,7,42,999", "--seed", "1234", "--batch-size", "4",
        "--upstream-seeding", "--npz", "--out", out,
    )  # fmt: skip
    with np.load(out / "samples.npz") as z:
        diff = np.abs(z["arr_0"].astype(int) - ref_uint8(ref, "seeded_k900_p0.96_cfg1.5_seed1234_img").astype(int))
    assert diff.max() <= 1


def job(batch_size, num_per_class=3, seed=5):
    return SampleJob.blocks([0, 7], num_per_class, seed=seed, batch_size=batch_size, opts=SamplingOptions())


def read_all(out, j):
    return np.stack([load_png(out / png_name(i, j.label(i))) for i in range(j.total)])


def make(model, vae, j, out, rank=0, world=1, overwrite=False):
    prepare_out_dir(out, job_record(j, "model", "vae", None, "fp32"), overwrite)
    return run_sample_job(model, vae, j, out, runtime=CPU, rank=rank, world=world)


@pytest.mark.slow
def test_sharded_and_resumed_runs_write_the_images_of_one_uninterrupted_run(d2, tmp_path):
    """For a given batch size, image i is always made in the same canonical batch."""
    var, vae = d2
    make(var, vae, job(4), tmp_path / "a")  # canonical batches: images 0-3 and 4-5
    base = read_all(tmp_path / "a", job(4))
    assert len({img.tobytes() for img in base}) == 6  # different images

    for rank in (1, 0):  # two "processes", one folder
        make(var, vae, job(4), tmp_path / "b", rank=rank, world=2)
    assert np.array_equal(read_all(tmp_path / "b", job(4)), base)

    (tmp_path / "a" / png_name(4, 7)).unlink()
    result = make(var, vae, job(4), tmp_path / "a")  # resume: batch 1 is made again, one file written
    assert (result.generated, result.skipped) == (1, 5)
    assert np.array_equal(read_all(tmp_path / "a", job(4)), base)


@pytest.mark.slow
def test_a_folder_with_another_runs_images_is_refused(d2, tmp_path):
    var, vae = d2
    make(var, vae, job(4, num_per_class=1), tmp_path)
    with pytest.raises(OutputError, match="differs in seed"):
        make(var, vae, job(4, num_per_class=1, seed=6), tmp_path)
    with pytest.raises(OutputError, match="differs in batch_size"):
        make(var, vae, job(2, num_per_class=1), tmp_path)
    result = make(var, vae, job(4, num_per_class=1, seed=6), tmp_path, overwrite=True)
    assert (result.generated, result.skipped) == (2, 0)


@pytest.mark.slow
def test_extending_a_partial_batch_makes_its_images_again(d2, tmp_path):
    var, vae = d2
    make(var, vae, SampleJob([0, 7, 42], seed=1, batch_size=2), tmp_path)  # batches {0, 1}, {2}
    result = make(var, vae, SampleJob([0, 7, 42, 3], seed=1, batch_size=2), tmp_path)  # image 2 now has a companion
    assert (result.generated, result.skipped) == (2, 2)


@pytest.mark.slow
def test_sample_cli_refuses_another_runs_folder(run_cli, tmp_path):
    run_cli("sample", VAR, "--vae", VAE, "--classes", "0", "--out", tmp_path)
    r = run_cli("sample", VAR, "--vae", VAE, "--classes", "0", "--seed", "9", "--out", tmp_path, expect=2)
    assert "holds images of another run (it differs in seed)" in r.stderr and "--overwrite" in r.stderr


def test_class_out_of_range(run_cli, tmp_path):
    r = run_cli("sample", VAR, "--vae", VAE, "--classes", "0,1000", "--out", tmp_path / "x", expect=2)
    assert "class id 1000 is out of range" in r.stderr


def test_output_that_cannot_be_written(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_cli("sample", VAR, "--vae", VAE, "--classes", "0", "--out", blocker / "sub", expect=2)
    assert "cannot write" in r.stderr


def test_vae_and_var_swapped(run_cli, tmp_path):
    r = run_cli("sample", VAE, "--vae", VAR, "--out", tmp_path / "x", expect=2)
    assert "is a VQVAE checkpoint, not a VAR" in r.stderr
    r = run_cli("sample", VAR, "--vae", VAR, "--out", tmp_path / "x", expect=2)
    assert "is a VAR model, not a VQVAE" in r.stderr


@pytest.mark.slow
def test_errors_are_one_line_without_traceback_and_debug_shows_it(tmp_path):
    args = ["sample", str(tmp_path / "nope.pth"), "--vae", str(VAE), "--out", str(tmp_path)]
    cmd = [sys.executable, "-m", "actvar_cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no such file" in lines[0], r.stderr
    r = subprocess.run([sys.executable, "-m", "actvar_cli", "--debug", *args], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_inspect_json(run_cli):
    import hashlib
    import json

    r = run_cli("inspect", VAR, "--json")
    report = json.loads(r.stdout)
    assert report["kind"] == "var" and report["config"]["depth"] == 2 and report["config"]["num_heads"] == 2
    assert report["sha256"] == hashlib.sha256(VAR.read_bytes()).hexdigest()
    assert report["dtype"] == "float32"
    r = run_cli("inspect", VAE, "--json", "--no-hash")
    assert json.loads(r.stdout)["kind"] == "vqvae"


def test_tiny_sample_runs(run_cli, tmp_path):
    run_cli("sample", "tiny", "--classes", "1,2", "--out", tmp_path / "t")
    assert (tmp_path / "t" / "grid.png").exists()
