"""Stacks: parts merged scale by scale, what cannot hold refused in one line, skipped tokens' keys."""

import pytest
import torch

from actvar_cli.errors import ConfigError
from actvar_cli.sparsity.stacks import parse_stack, stack_policy


def merged(spec, scales=7):
    return stack_policy(parse_stack(spec), scales)


def test_parts_act_on_their_own_share_of_the_work():
    p = merged("cfg-off:1+fastvar:0.25")
    assert p.guidance_off == 1 and p.token_rule == "far-from-mean" and p.token_rates == (0.75, 0.75)
    p = merged("dmoe:0.5+fixed-tokens:0.75+skipped-kv")
    assert p.scales == (5, 6, 7) and p.token_rates == (1.0, 0.75, 0.75) and p.skipped_kv and not p.skipped_update
    assert p.expert_rule == "threshold" and p.thresholds == (0.25, 0.375, 0.5)
    p = merged("fixed-tokens:0.5+skipped-update")
    assert p.skipped_update and not p.skipped_kv and p.to_dict()["skipped_update"]
    p = merged("static-experts:0.5+ear:0.75")
    assert p.weight_rates == (0.5, 0.5) and p.token_rule == "centre"
    assert parse_stack("fastvar:0.5+int8").quantization == "int8"
    assert parse_stack("cfg-sharp:2+w8a8").quantization == "w8a8"
    p = merged("cfg-sharp:2+fixed-tokens:0.5+skipped-kv")
    assert p.guidance_off == 2 and p.guidance_sharpen and p.to_dict()["guidance_sharpen"]
    assert not merged("cfg-off:2").guidance_sharpen and "guidance_sharpen" not in merged("cfg-off:2").to_dict()
    assert merged("int8") is None  # the dense model, quantized


@pytest.mark.parametrize(
    "spec, words",
    [
        ("fastvar:0.5+fixed-tokens:0.5", "both prune tokens"),
        ("dmoe:0.5+static-experts:0.5", "both prune experts"),
        ("skip-last:1+ear:0.5", "skips the last 1"),
        ("cfg-off:1+cfg-off:2", "more than once"),
        ("int8+int4", "one quantization"),
        ("w8a8+int8", "one quantization"),
        ("cfg-off:1+cfg-sharp:2", "both turn guidance off"),
        ("w8a8:2", "takes no parameter"),
        ("fastvar:0.5+skipped-kv", "skipped-kv"),
        ("cfg-off:1+skipped-kv", "skipped-kv"),
        ("fastvar:0.5+skipped-update", "skipped-update"),
        ("cfg-off:1+skipped-update", "skipped-update"),
        ("cfg-off:1++fastvar", "empty part"),
        ("dense+cfg-off:1", "reference"),
        ("int8:4", "takes no parameter"),
    ],
)
def test_a_stack_that_cannot_hold_is_one_line(spec, words):
    with pytest.raises(ConfigError, match=words):
        merged(spec)


def test_cfg_sharp_is_refused_where_a_model_was_trained_without_guidance(run_cli, tmp_path):
    from actvar_cli.sparsity.policy import SparsityPolicy

    distilled = SparsityPolicy(scales=(), token_rates=(), weight_rates=(), guidance_off=7)
    with pytest.raises(ConfigError, match="trained without guidance"):
        stack_policy(parse_stack("actvar+cfg-sharp:1"), 7, distilled)
    assert stack_policy(parse_stack("actvar+w8a8"), 7, distilled).guidance_off == 7
    sharpened = SparsityPolicy(scales=(), token_rates=(), weight_rates=(), guidance_off=1, guidance_sharpen=True)
    with pytest.raises(ConfigError, match="both turn guidance off"):  # a cfg-sharp file is not trained
        stack_policy(parse_stack("actvar+cfg-sharp:2"), 7, sharpened)
    path = tmp_path / "sharp.safetensors"
    run_cli("moefy", "tiny", "-o", path, "--method", "cfg-sharp:1", "--calib-images", "2")
    r = run_cli("distill-stage2", path, "--config", "tiny", "--out-dir", tmp_path / "d", expect=2)
    assert "cfg-sharp" in r.stderr and len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr


def test_stacks_are_one_line_and_exit_2_in_every_command(run_cli, tmp_path):
    for args in (
        ["compare", "tiny", "--methods", "fastvar:0.5+fixed-tokens:0.5"],
        ["flops", "--arch", "tiny", "--method", "skip-last:1+fastvar:0.5"],
        ["moefy", "tiny", "-o", tmp_path / "m.safetensors", "--method", "dmoe:0.5+static-experts:0.5"],
    ):
        r = run_cli(*args, expect=2)
        assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr


@pytest.mark.slow
def test_a_stacked_model_file_runs_everywhere(run_cli, tmp_path):
    import json

    path = tmp_path / "stack.safetensors"
    run_cli(
        "moefy", "tiny", "-o", path, "--method", "cfg-off:1+fixed-tokens:0.5+skipped-kv+int8", "--calib-images", "2"
    )
    info = json.loads(run_cli("inspect", path, "--json").stdout)
    assert info["metadata"]["method"] == "cfg-off:1+fixed-tokens:0.5+skipped-kv+int8" and info["quantization"]
    flops = json.loads(run_cli("flops", path, "--json").stdout)
    assert flops["policy"]["guidance_off"] == 1 and flops["policy"]["skipped_kv"] and flops["savings"] > 0.2
    run_cli("sample", path, "--out", tmp_path / "s", "--classes", "0-3")
    run_cli("eval", path, "--teacher", "auto", "--num", "2", "--batch-size", "2", "--out", tmp_path / "e")
    run_cli("bench", "tiny", path, "--repeats", "1", "--batch-size", "2")
    run_cli("compare", "tiny", "--methods", f"actvar:{path}", "--num", "2", "--repeats", "1")
    run_cli("push", path, "--repo", "me/stack", "--dry-run", tmp_path / "card")
    card = (tmp_path / "card" / "README.md").read_text()
    assert "fixed-tokens:0.5" in card and "int8" in card


def test_skipped_tokens_stay_keys_in_generation_and_teacher_forcing(tiny):
    from actvar_cli.convert.moefy import MoefyOptions, moefy
    from actvar_cli.generation.sampling import SamplingOptions, generate, image_generators
    from actvar_cli.models.checkpoint import load_var
    from actvar_cli.sparsity.policy import SparsityPolicy

    _, vae = tiny
    policy = SparsityPolicy(scales=(6, 7), token_rates=(0.5, 0.5), weight_rates=(1.0,), token_rule="fixed",
                            skipped_kv=True)  # fmt: skip
    model, _ = moefy(load_var("tiny")[0], vae, MoefyOptions(policy=policy, calib_images=2))
    labels = torch.tensor([1, 4])
    made = []
    original = model.new_cache
    model.new_cache = lambda *a: made.append(original(*a)) or made[-1]
    gen = generate(model, vae, labels, SamplingOptions(cfg=0), rng=image_generators(0, [0, 1], "cpu"),
                   policy=policy, keep_logits=True)  # fmt: skip
    assert all(c.length == 155 for c in made[0])  # every token is cached, though half are skipped
    x = vae.quantize.idx_to_var_input(gen.tokens)
    tf = model.forward_train(labels, x, policy).logits
    forced = generate(model, vae, labels, SamplingOptions(cfg=0), rng=image_generators(0, [0, 1], "cpu"),
                      policy=policy, keep_logits=True, forced=gen.tokens)  # fmt: skip
    torch.testing.assert_close(tf, torch.cat([lg[:2] for lg in forced.logits], 1), atol=2e-4, rtol=1e-4)
