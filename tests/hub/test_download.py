"""`actvar download` through real huggingface_hub code, against a loopback Hub and offline."""

import json
from pathlib import Path

import pytest
from fakehub import FakeHub

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB stand-in for var_d16.pth


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as h:
        h.add_file("FoundationVision/var", "var_d16.pth", PAYLOAD)
        h.add_file("FoundationVision/var", "vae_ch160v4096z32.pth", b"vae" * 1000)
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def paths_of(result):
    return {k: [Path(p) for p in v] for k, v in json.loads(result.stdout).items()}


def test_download_into_cache_then_offline(run_cli, hub, monkeypatch):
    got = paths_of(run_cli("download", "d16", "vae", "--json"))
    assert got["d16"][0].read_bytes() == PAYLOAD
    assert got["d16"][0].name == "var_d16.pth" and "models--FoundationVision--var" in str(got["d16"][0])
    assert ("HEAD", "/FoundationVision/var/resolve/main/var_d16.pth") in hub.requests

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the Hub is gone
    again = paths_of(run_cli("download", "d16", "--json"))
    assert again["d16"][0].read_bytes() == PAYLOAD
    r = run_cli("download", "d20", expect=2)
    assert "not in the local cache" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


def test_offline_flag_and_uncached_file(run_cli, hub):
    r = run_cli("download", "d16", "--offline", expect=2)
    assert "not in the local cache" in r.stderr


def test_local_dir_and_revision(run_cli, hub, tmp_path):
    sha = hub.repos["FoundationVision/var"].sha
    got = paths_of(run_cli("download", "d16", "--local-dir", tmp_path / "w", "--revision", sha, "--json"))
    assert got["d16"][0] == tmp_path / "w" / "var_d16.pth"
    assert got["d16"][0].read_bytes() == PAYLOAD
    r = run_cli("download", "d16", "--revision", "v9", expect=2)
    assert "revision 'v9' does not exist" in r.stderr


def test_broken_transfer_resumes_where_it_stopped(run_cli, hub):
    # huggingface_hub keeps what it wrote in whole 10 MiB chunks and asks for the rest with Range
    big = bytes(range(251)) * (12 * 1024 * 1024 // 251)
    hub.add_file("FoundationVision/var", "var_d30.pth", big)
    hub.drop_once["var_d30.pth"] = 11 * 1024 * 1024
    got = paths_of(run_cli("download", "d30", "--json"))
    assert got["d30"][0].read_bytes() == big
    assert hub.ranges == [f"bytes={10 * 1024 * 1024}-"]


def test_missing_things(run_cli, hub):
    assert "not in FoundationVision/var" in run_cli("download", "d20", expect=2).stderr
    assert "was not found" in run_cli("download", "nobody/nothing", expect=2).stderr
    assert "not a model name" in run_cli("download", "what/is/this", expect=2).stderr


@pytest.mark.shared
def test_cached_official_names_work_as_model_arguments(run_cli, hub, monkeypatch):
    from conftest import PARITY

    hub.add_file("FoundationVision/var", "var_d16.pth", (PARITY / "var_d2.pth").read_bytes())
    run_cli("download", "d16")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = json.loads(run_cli("inspect", "d16", "--json", "--no-hash").stdout)
    assert report["config"]["depth"] == 2  # the file that the cache holds under the name d16
    r = run_cli("inspect", "d24", expect=2)
    assert "run `actvar download d24`" in r.stderr
