"""``actvar tune``: a search over stacks that writes the chosen model, caches what it measured, and
picks up where it stopped."""

import json

import pytest

from actvar_cli.measure import tune as T


@pytest.fixture
def small_space(monkeypatch):
    monkeypatch.setattr(T, "GUIDANCE", ("", "cfg-off:1"))
    monkeypatch.setattr(T, "TOKENS", ("", "fixed-tokens:0.5+skipped-kv"))
    monkeypatch.setattr(T, "EXPERTS", ("",))
    monkeypatch.setattr(T, "WEIGHTS", ("", "w8a8"))
    monkeypatch.setattr(T, "SKIPS", ("",))


def test_the_search_space_holds_only_stacks_that_hold():
    stacks = T.search_space(7, ["runs/x.safetensors"])
    assert "fastvar:0.5+dmoe:0.5+cfg-sharp:1+w8a8" in stacks and "actvar:runs/x.safetensors+cfg-sharp:2" in stacks
    assert "fixed-tokens:0.5+skipped-kv+skipped-update+cfg-sharp:2" in stacks and "actvar:runs/x.safetensors" in stacks
    assert "cfg-sharp:3+w8a8+skip-last:2" in stacks and "actvar:runs/x.safetensors+cfg-sharp:1+w8a8" in stacks
    assert not any("skip-last:1" in s and ("fastvar" in s or "fixed-tokens" in s) for s in stacks)  # cannot hold
    assert "cfg-sharp:1+skip-last:1" not in stacks  # guidance off only where nothing is generated: skip-last:1 again
    assert len(stacks) == len(set(stacks))
    named = [s for s in stacks if T._names_a_candidate(s)]  # what comes first to the full yardstick
    assert named == ["actvar:runs/x.safetensors", "actvar:runs/x.safetensors+w8a8"]


@pytest.mark.slow
def test_tune_writes_the_chosen_model_and_resumes_from_its_cache(run_cli, small_space, tmp_path):
    out, cache, plot = tmp_path / "t.safetensors", tmp_path / "cache", tmp_path / "f.png"
    args = ["tune", "tiny", "--ref", "shapes", "--num", "16", "--repeats", "1", "--max-evals", "2", "--json",
            "--cache", cache, "--out", out, "--plot", plot]  # fmt: skip
    first = json.loads(run_cli(*args).stdout)
    assert first["chosen"] and first["output"] and (tmp_path / "f.png").stat().st_size > 1000
    assert sum(p["fid"] is not None for p in first["points"]) == 2
    drift = {p["stack"]: p["drift"] for p in first["points"]}
    assert drift["cfg-off:1+w8a8"] == drift["cfg-off:1"] and drift["w8a8"] == 0  # their float twins' (dense: 0)
    estimate = {p["stack"]: p["estimate"] for p in first["points"]}
    assert estimate["cfg-off:1+w8a8"] / estimate["cfg-off:1"] == pytest.approx(estimate["w8a8"])
    info = json.loads(run_cli("inspect", tmp_path / "t.safetensors", "--json").stdout)
    assert info["metadata"]["method"] == first["chosen"]
    run_cli("sample", tmp_path / "t.safetensors", "--out", tmp_path / "s", "--classes", "0-1")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    (tmp_path / "t.safetensors").unlink()
    second = json.loads(run_cli(*args).stdout)  # everything from the cache: the same points, nothing new
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
    assert [p["fid"] for p in second["points"]] == [p["fid"] for p in first["points"]]
