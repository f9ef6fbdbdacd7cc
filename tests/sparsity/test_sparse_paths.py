"""ActVAR conversion and sparse inference: same function at full activation, consistent paths,
honest FLOPs, and a self-describing safetensors file."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import LABELS, PARITY
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from actvar_cli.convert.moefy import MoefyOptions, moefy
from actvar_cli.errors import ConfigError
from actvar_cli.generation.sampling import SamplingOptions, decode_images, generate, image_generators
from actvar_cli.models.checkpoint import load_var
from actvar_cli.models.kv_cache import LayerCache
from actvar_cli.sparsity import experts
from actvar_cli.sparsity.blocks import GenerationState, block_generate
from actvar_cli.sparsity.flops import count_flops
from actvar_cli.sparsity.policy import ScalePlan, SparsityPolicy

pytestmark = pytest.mark.shared  # uses ../shared/fixtures

FULL = SparsityPolicy(token_rates=(1.0,), weight_rates=(1.0,))


@pytest.fixture(scope="module")
def converted(d2):
    """The parity model converted with each split (calibrated on 4 self-generated images)."""
    _, vae = d2
    out = {}
    for split in ("cluster", "contiguous", "coactivation"):
        dense, _ = load_var(PARITY / "var_d2.pth")
        out[split], _ = moefy(dense, vae, MoefyOptions(split=split, calib_images=4))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("split", ["cluster", "contiguous", "coactivation"])
def test_full_activation_reproduces_upstream(converted, d2, ref, split):
    model = converted[split]
    _, vae = d2
    with torch.no_grad():
        logits = model(torch.tensor(LABELS), torch.from_numpy(ref["teacher_forcing_input"]))
    np.testing.assert_allclose(logits[:, ::7].numpy(), ref["teacher_forcing_logits_every7"], atol=1e-3)
    gen = generate(model, vae, torch.tensor(LABELS), SamplingOptions(cfg=1.5, top_k=1, top_p=0.0), policy=FULL)
    for si, tok in enumerate(gen.tokens):
        assert torch.equal(tok, torch.from_numpy(ref[f"greedy_tokens_s{si}"]))
    np.testing.assert_allclose(decode_images(vae, gen.f_hat).numpy(), ref["greedy_cfg1.5_img"], atol=1e-3)


def plan(n, keep_tokens, keep_experts, rule="selector", threshold=None):
    return ScalePlan(tokens=n, keep_tokens=keep_tokens, token_rule=rule, keep_experts=keep_experts,
                     threshold=threshold, guided=True)  # fmt: skip


def test_sparse_kernels_at_full_activation_equal_dense_block(converted):
    block = converted["cluster"].blocks[1]
    torch.manual_seed(0)
    x, cond = torch.randn(6, 25, 128), torch.randn(6, 128)
    past = torch.randn(6, 2, 40, 64)
    caches = [LayerCache(), LayerCache()]
    for c in caches:
        c.append(past.clone(), past.clone())
    with torch.no_grad():
        dense = block(x, cond, None, caches[0])
        state = GenerationState(record_sublayers=True)  # forces the sparse path even where all is kept
        sparse_out = block_generate(block, x, cond, caches[1], plan=plan(25, 25, 16), state=state, index=1, scale=9)
        h = torch.randn(30, 128)
        for kernel in ("loop", "grouped", "masked"):
            pairs = experts.topk_pairs(torch.arange(16).repeat(30, 1), 16)
            torch.testing.assert_close(
                experts.experts_forward(block.ffn, h, pairs, kernel), block.ffn(h), atol=1e-5, rtol=1e-5
            )
    torch.testing.assert_close(sparse_out, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].k, caches[0].k)


@pytest.mark.parametrize("kernel", ["loop", "grouped", "masked"])
def test_experts_forward_computes_only_the_chosen_experts(converted, kernel):
    ffn = converted["cluster"].blocks[0].ffn
    torch.manual_seed(1)
    h = torch.randn(40, 128)
    chosen = experts.route(ffn.router(h), 12)
    d_e = 512 // 16
    mask = torch.zeros(40, 16).scatter_(1, chosen, 1.0).repeat_interleave(d_e, dim=1)  # 40, F
    pairs = experts.topk_pairs(chosen, 16)
    with torch.no_grad():
        expected = torch.nn.functional.linear(ffn.act(ffn.fc1(h)) * mask, ffn.fc2.weight, ffn.fc2.bias)
        torch.testing.assert_close(experts.experts_forward(ffn, h, pairs, kernel), expected, atol=1e-5, rtol=1e-5)
        with FlopCounterMode(display=False) as fc:
            experts.experts_forward(ffn, h, pairs, kernel)
    experts_run = 16 if kernel == "masked" else 12  # masked: the same sum from every expert's units
    assert fc.get_total_flops() == 4 * 40 * experts_run * d_e * 128  # two GEMMs


def test_auto_takes_the_masked_kernel_on_a_cpu_only_for_few_rows_per_expert(converted):
    ffn = converted["cluster"].blocks[0].ffn  # C = 128, d_e = 32: 4096 multiply-adds per row of an expert
    rows = experts.MASKED_BELOW_MACS_PER_EXPERT // 4096
    for tokens, kernel in ((rows - 16, "masked"), (rows + 16, "loop")):
        pairs = experts.topk_pairs(torch.arange(16).repeat(tokens, 1), 16)  # every expert gets `tokens` rows
        assert experts.pick_kernel("loop", ffn, torch.zeros(tokens, 128), pairs.token.shape[0]) == "loop"
        assert experts.pick_kernel("auto", ffn, torch.zeros(tokens, 128), pairs.token.shape[0]) == kernel


@pytest.fixture(scope="module")
def with_means(d2):
    """The parity model converted with dropped-expert means (fitted for experts at 50%)."""
    dense, vae = load_var(PARITY / "var_d2.pth")[0], d2[1]
    policy = SparsityPolicy(weight_rates=(0.5,))
    return moefy(dense, vae, MoefyOptions(calib_images=4, expert_means=True, policy=policy))[0]


FIXED_FILLED = SparsityPolicy(
    token_rates=(0.5, 0.75), weight_rates=(0.5,), token_rule="fixed", skipped_kv=True, skipped_update=True
)
SELECTOR_FILLED = SparsityPolicy(scales=(8, 9, 10), token_rates=(0.5,), weight_rates=(0.5,), skipped_update=True)


@pytest.mark.parametrize(
    "which, policy",
    [
        ("cluster", SparsityPolicy(token_rates=(0.5, 0.75), weight_rates=(0.5,))),
        ("means", SparsityPolicy(token_rates=(0.5, 0.75), weight_rates=(0.5,))),
        ("means", FIXED_FILLED),
        ("cluster", SELECTOR_FILLED),
    ],
)
def test_generation_and_teacher_forcing_paths_agree(converted, with_means, d2, which, policy):
    """Same tokens and the same routing give the same logits on both paths."""
    model = with_means if which == "means" else converted[which]
    _, vae = d2
    dense_len = model.begin_ends[policy.scales[0] - 1][0]
    labels = torch.tensor([3, 500])
    gen = generate(
        model, vae, labels, SamplingOptions(), rng=image_generators(7, [0, 1], "cpu"), policy=policy, keep_logits=True
    )
    x = vae.quantize.idx_to_var_input(gen.tokens)
    both = torch.cat((labels, torch.full_like(labels, 1000)))  # the CFG rows: conditional, unconditional
    with torch.no_grad():
        masked = model.forward_train(both, x.repeat(2, 1, 1), policy=policy)
        dense = model.forward_train(both, x.repeat(2, 1, 1), policy=None)
    generated = torch.cat(gen.logits, dim=1)
    # Both paths rank the same scores, computed in other batch shapes: a router or selector score
    # within float noise of the top-K boundary may rank the other way (seen: a margin of 7e-8).
    off = ((masked.logits - generated).abs() > 2e-4 + 1e-4 * generated.abs()).any(-1)  # B, L
    assert off.float().mean() < 0.002, off.nonzero().tolist()[:10]
    assert (dense.logits - generated)[:, dense_len:].abs().max() > 0.1  # sparsity really changed something
    torch.testing.assert_close(dense.logits[:, :dense_len], generated[:, :dense_len], atol=2e-4, rtol=1e-4)


def test_expert_means_are_what_dropped_experts_add_on_average(with_means):
    """A fitted mean is the dropped expert's mean output; at full activation the means add nothing."""
    ffn = with_means.blocks[1].ffn
    h = torch.randn(64, 128)
    chosen = torch.zeros(64, 16).scatter_(1, torch.randint(0, 16, (64, 3)), 1.0)
    N, d_e = 16, ffn.fc1.out_features // 16
    with torch.no_grad():
        act = torch.nn.functional.gelu(ffn.fc1(h), approximate="tanh").view(64, N, d_e)
        per_expert = torch.einsum("tnd,cnd->tnc", act, ffn.fc2.weight.view(128, N, d_e))  # T, N, C
        want = (per_expert * (1 - chosen).unsqueeze(-1)).sum(0) / (1 - chosen).sum(0).clamp_min(1).unsqueeze(-1)
        torch.testing.assert_close(experts.dropped_means(ffn, h, chosen, chunk=16), want, atol=1e-5, rtol=1e-4)
        assert ffn.dropped_mean.abs().max() > 0  # fitted at conversion, not left at zero
        assert torch.equal(ffn.dropped_output(torch.ones(4, 16)), torch.zeros(4, 128))
        filled = ffn.dropped_output(chosen)
        torch.testing.assert_close(filled, (1 - chosen) @ ffn.dropped_mean)


def test_expert_means_change_nothing_where_every_expert_runs(with_means, converted, d2, ref):
    with torch.no_grad():
        logits = with_means(torch.tensor(LABELS), torch.from_numpy(ref["teacher_forcing_input"]))
    np.testing.assert_allclose(logits[:, ::7].numpy(), ref["teacher_forcing_logits_every7"], atol=1e-3)


def test_skipped_tokens_receive_the_previous_scale_update_when_asked(converted):
    """skipped_update: a skipped token is its input plus the block's previous-scale update, resized."""
    block = converted["cluster"].blocks[0]
    x, cond, prev = torch.randn(2, 16, 128), torch.randn(2, 128), torch.randn(2, 9, 128)
    filled = dataclasses.replace(plan(16, 4, 8), skipped_update=True, record_update=True)
    state = GenerationState(updates={0: prev})
    with torch.no_grad():
        y = block_generate(block, x, cond, LayerCache(), plan=filled, state=state, index=0, scale=9)
    up = torch.nn.functional.interpolate(prev.transpose(1, 2).reshape(2, 128, 3, 3), size=(4, 4), mode="area")
    want = x + up.reshape(2, 128, 16).transpose(1, 2)
    skipped = (y == want).all(-1)
    assert skipped.sum(1).tolist() == [12, 12]
    torch.testing.assert_close(state.updates[0], y - x)  # what the next scale receives


def test_skipped_tokens_pass_through_unchanged(converted):
    block = converted["cluster"].blocks[0]
    x, cond = torch.randn(2, 16, 128), torch.randn(2, 128)
    with torch.no_grad():
        y = block_generate(block, x, cond, LayerCache(), plan=plan(16, 4, 8), state=GenerationState(), index=0, scale=9)
    unchanged = (y == x).all(-1)  # B, n
    assert unchanged.sum(1).tolist() == [12, 12]


@pytest.mark.parametrize("experts", [7, 1000])
def test_expert_count_must_divide_the_ffn(d2, experts):
    dense, _ = load_var(PARITY / "var_d2.pth")
    with pytest.raises(ConfigError, match="do not divide the FFN width 512"):
        moefy(dense, None, MoefyOptions(num_experts=experts, calib_images=0))


def test_policy_errors():
    with pytest.raises(ConfigError, match="outside"):
        SparsityPolicy(token_rates=(1.5,))
    with pytest.raises(ConfigError, match="sparse scales but"):
        SparsityPolicy(scales=(9, 10), token_rates=(0.5, 0.6, 0.7))
    dense, _ = load_var(PARITY / "var_d2.pth")
    with pytest.raises(ConfigError, match="scale 11 does not exist"):
        moefy(dense, None, MoefyOptions(policy=SparsityPolicy(scales=(11,), token_rates=(0.5,)), calib_images=0))


@pytest.mark.slow
@pytest.mark.parametrize(
    "which, policy",
    [
        ("cluster", None),
        ("cluster", SparsityPolicy()),
        ("cluster", SparsityPolicy(scales=(7, 8, 10), token_rates=(0.5,))),
        ("means", FIXED_FILLED),
    ],
)
def test_analytic_flops_match_torch_flop_counter(converted, with_means, d2, which, policy):
    model = with_means if which == "means" else converted[which]
    _, vae = d2
    B = 2
    state = GenerationState(kernel="loop")  # a kernel that computes only the chosen experts
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # math SDPA is visible to the counter
        labels, rng = torch.tensor([1, 2]), image_generators(0, [0, 1], "cpu")
        generate(model, vae, labels, SamplingOptions(), rng=rng, policy=policy, state=state)
    report = count_flops(model.cfg, policy)
    expected = B * (report.sparse_flops if policy else report.dense_flops)
    assert abs(fc.get_total_flops() - expected) / expected < 0.01, (fc.get_total_flops(), expected)


@pytest.mark.slow
def test_moefy_cli_writes_self_describing_safetensors(run_cli, tmp_path, ref):
    out = tmp_path / "actvar.safetensors"
    r = run_cli(
        "moefy", PARITY / "var_d2.pth", "--experts", "16", "--vae", PARITY / "vae_ch32v4096z32.pth",
        "--token-rates", "0.5,0.75", "--weight-rate", "0.5", "--calib-images", "2", "-o", out, "--json",
    )  # fmt: skip
    summary = json.loads(r.stdout)
    assert summary["router_init"] == "calibration"
    model, info = load_var(out)
    assert info.kind == "actvar" and info.format == "safetensors"
    meta = info.metadata
    assert meta["format"] == "actvar" and meta["format_version"] == "1"
    assert meta["base_checkpoint"] == "var_d2.pth"
    assert meta["base_sha256"] == hashlib.sha256((PARITY / "var_d2.pth").read_bytes()).hexdigest()
    assert json.loads(meta["experts"]) == 16 and meta["split"] == "cluster"
    assert json.loads(meta["var_config"])["num_experts"] == 16
    assert info.policy == SparsityPolicy(scales=(9, 10), token_rates=(0.5, 0.75), weight_rates=(0.5, 0.5))
    assert model.blocks[0].ffn.router.weight.abs().sum() > 0 and model.blocks[0].selector.weight.abs().sum() > 0
    report = json.loads(run_cli("inspect", out, "--json").stdout)
    assert report["kind"] == "actvar" and report["policy"]["token_rates"] == [0.5, 0.75]
    flops = json.loads(run_cli("flops", out, "--json").stdout)
    assert flops["savings"] == pytest.approx(count_flops(model.cfg, info.policy).savings)
    assert flops["policy"]["weight_rates"] == [0.5, 0.5] and flops["savings"] > 0.1
    # the converted file still reproduces upstream when every token and expert is active
    run_cli(
        "sample", out, "--vae", PARITY / "vae_ch32v4096z32.pth", "--dense", "--top-k", "1",
        "--classes", "0,7,42,999", "--npz", "--out", tmp_path / "s",
    )  # fmt: skip
    with np.load(tmp_path / "s" / "samples.npz") as z:
        expected = (ref["greedy_cfg1.5_img"] * 255 + 0.5).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        assert np.abs(z["arr_0"].astype(int) - expected).max() <= 1


def test_moefy_cli_errors(run_cli, tmp_path):
    r = run_cli("moefy", PARITY / "var_d2.pth", "--experts", "7", "-o", tmp_path / "x.safetensors", expect=2)
    assert "7 experts do not divide the FFN width 512" in r.stderr
    r = run_cli("moefy", PARITY / "var_d2.pth", "--token-rate", "0", "-o", tmp_path / "x.safetensors", expect=2)
    assert "rate 0.0 is outside (0, 1]" in r.stderr
    r = run_cli("moefy", PARITY / "vae_ch32v4096z32.pth", "-o", tmp_path / "x.safetensors", expect=2)
    assert "not a VAR" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_bench_and_sample_accept_actvar_models(run_cli, tmp_path):
    out = tmp_path / "tiny-actvar.safetensors"
    run_cli("moefy", "tiny", "-o", out, "--calib-images", "2")
    run_cli("sample", out, "--vae", "tiny", "--classes", "1,2", "--out", tmp_path / "s")
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2
    r = run_cli("bench", "tiny", out, "--vae", "tiny", "--batch-size", "2", "--repeats", "1", "--json")
    result = json.loads(r.stdout)
    for key in ("speedup", "speedup_end_to_end", "ideal_speedup"):
        assert result[key] > 0
    assert result["ideal_speedup"] == pytest.approx(1 / (1 - result["savings"]))


def test_bench_breakdown_times_components_and_scales(run_cli, tmp_path):
    r = run_cli("bench", "--arch", "tiny", "--batch-size", "1", "--repeats", "1", "--breakdown", "--json")
    result = json.loads(r.stdout)
    assert set(result["breakdown"]["sparse"]["seconds"]) >= {"attention", "ffn", "select", "other", "total"}
    scales = result["by_scale"]["scales"]
    assert [s["tokens"] for s in scales] == [1, 4, 9, 16, 25, 36, 64]
    assert [s["flops_ratio"] > 1.01 for s in scales] == [False] * 5 + [True] * 2  # the last two scales are sparse
    steps = sum(s["dense_s"] for s in scales)
    assert 0 < steps < result["dense"]["generation_s"]
    assert result["by_scale"]["outside_steps_s"] == pytest.approx(result["dense"]["generation_s"] - steps)
    plot = tmp_path / "scales.png"
    r = run_cli("bench", "--arch", "tiny", "--batch-size", "1", "--repeats", "1", "--by-scale", "--plot", plot)
    assert "time per scale" in r.stdout and plot.stat().st_size > 10_000
