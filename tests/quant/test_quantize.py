"""Quantization: error bounds, packing, int8 products, which layers, kernels, files and commands."""

import json
import weakref

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from actvar_cli.errors import CheckpointError, ConfigError
from actvar_cli.generation.sampling import SamplingOptions, generate, image_generators
from actvar_cli.models.checkpoint import (
    load_vae,
    load_var,
    read_state_dict,
    save_model,
    save_safetensors,
    user_metadata,
)
from actvar_cli.models.config import VARConfig
from actvar_cli.models.var import VAR
from actvar_cli.quant import linear as qlinear
from actvar_cli.quant.apply import quantizable_layers, quantize_model, scheme_of
from actvar_cli.quant.linear import (
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from actvar_cli.sparsity import experts

SMALL = VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=3, vocab_size=32, vae_dim=8,
                  patch_nums=(1, 2, 3), vae_stride=4, num_experts=4)  # fmt: skip


def one_line_error(r, *words):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], r.stderr


def small_model(cfg: VARConfig = SMALL, seed: int = 0) -> VAR:
    torch.manual_seed(seed)
    return VAR(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    """``tiny`` quantized to int8 by the command."""
    from typer.testing import CliRunner

    from actvar_cli.cli import app

    path = tmp_path_factory.mktemp("quant") / "tiny-int8.safetensors"
    result = CliRunner().invoke(app, ["quantize", "tiny", "--weights", "int8", "-o", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    return path


# -- the numbers -----------------------------------------------------------------------------


def test_int8_error_is_at_most_half_a_row_scale():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    w[5] = 0  # an all-zero row must not divide by zero
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (48,) and s.dtype == torch.float32
    assert q.abs().max() <= 127
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6 * w.abs().amax(1, keepdim=True)).all()
    assert (dequantize_int8(q, s)[5] == 0).all()


@pytest.mark.parametrize("group", [16, 32, 96])
def test_int4_error_is_at_most_half_a_group_scale(group):
    torch.manual_seed(1)
    w = torch.randn(24, 192)
    w[:, :group] *= 50  # one group far larger than the others: its scale must not leak into them
    p, s = quantize_int4(w, group)
    assert p.dtype == torch.uint8 and p.shape == (24, 96) and s.shape == (24, 192 // group)
    err_OGg = (dequantize_int4(p, s) - w).abs().view(24, -1, group)
    assert (err_OGg <= s[..., None] / 2 + 1e-5).all()
    assert (unpack_int4(p).abs() <= 7).all()


def test_int4_packs_two_values_a_byte_and_unpacks_exactly():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # every value, both nibbles
    q = torch.cat((q, q.roll(1, dims=1)))
    packed = pack_int4(q)
    assert packed.shape == (6, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert pack_int4(torch.tensor([[-7, 7]], dtype=torch.int8)).item() == (1 | (15 << 4))  # column 0 low


def test_a_group_that_does_not_divide_the_width_is_one_config_error():
    with pytest.raises(ConfigError, match="does not divide the input width 100"):
        quantize_int4(torch.randn(4, 100), 64)
    model = small_model()
    with pytest.raises(ConfigError, match="--group-size 48"):
        quantize_model(model, "int4", 48)
    assert scheme_of(model) is None  # checked before any layer was replaced
    with pytest.raises(ConfigError, match="--weights int8"):
        quantize_model(model, "int3")


def test_quant_linear_computes_the_linear_layer_and_keeps_no_float_weight():
    torch.manual_seed(2)
    lin = nn.Linear(128, 64)
    x = torch.randn(5, 128)
    for weights, tol in (("int8", 0.02), ("int4", 0.2)):
        q = QuantLinear.from_linear(lin, weights, 64)
        assert set(q.state_dict()) == {"qweight", "scales", "bias"}
        assert q.bias.dtype == torch.float32 and torch.equal(q.bias, lin.bias)
        assert not any(t.is_floating_point() and t.numel() == lin.weight.numel() for t in q.state_dict().values())
        y, ref = q(x), lin(x)
        assert (y - ref).abs().max() < tol * ref.abs().max()
        torch.testing.assert_close(y, nn.functional.linear(x, q.weight, q.bias))
        with pytest.raises(AttributeError):
            q.weight = lin.weight.detach().clone()  # read-only: nothing can write a float weight back
        with pytest.raises(KeyError):
            q.weight = lin.weight  # nor register one as a parameter


def test_int8_activations_make_the_product_an_int8_one(monkeypatch):
    torch.manual_seed(3)
    lin = nn.Linear(128, 64)
    x = torch.randn(2, 5, 128)
    q = QuantLinear.from_linear(lin, "int8", activations="int8")
    products = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: products.append((a.dtype, b.dtype)) or int_mm(a, b))
    y, ref = q(x), lin(x)
    assert products == [(torch.int8, torch.int8)] and y.shape == ref.shape and y.dtype == torch.float32
    assert (y - ref).abs().max() < 0.03 * ref.abs().max()  # the input's rounding adds to the weights'
    other = torch.randn(64)  # attention passes its q/k/v biases to a layer that has none
    torch.testing.assert_close(q(x, other) - other, y - lin.bias, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="int8 weights"):
        QuantLinear(128, 64, weights="int4", activations="int8")


# -- which layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_aln", [False, True])
def test_only_the_block_linears_and_the_head_are_quantized(shared_aln):
    model = small_model(SMALL.replace(shared_aln=shared_aln))
    quantize_model(model, "int8")
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    expected = {"head"} | {
        f"blocks.{i}.{layer}"
        for i in range(2)
        for layer in ("attn.mat_qkv", "attn.proj", "ffn.fc1", "ffn.fc2") + (() if shared_aln else ("ada_lin.1",))
    }
    assert quantized == expected
    for name in ("blocks.0.ffn.router", "blocks.0.selector", "word_embed", "head_nm.ada_lin.1"):
        assert type(model.get_submodule(name)) is nn.Linear
    if shared_aln:
        assert not isinstance(model.shared_ada_lin[1], QuantLinear)
    assert not quantizable_layers(model)  # nothing left to quantize
    with pytest.raises(ConfigError, match="already quantized|is quantized"):
        quantize_model(model, "int4")


# -- the expert kernels read each layer's weight once -----------------------------------------


@pytest.fixture
def dequantized(monkeypatch):
    """How many float weights were made, and the most alive at once."""
    seen = {"made": 0, "alive": 0, "peak": 0}

    def gone():
        seen["alive"] -= 1

    def tracked(fn):
        def wrapper(*args):
            w = fn(*args)
            seen["made"] += 1
            seen["alive"] += 1
            seen["peak"] = max(seen["peak"], seen["alive"])
            weakref.finalize(w, gone)
            return w

        return wrapper

    monkeypatch.setattr(qlinear, "dequantize_int8", tracked(qlinear.dequantize_int8))
    monkeypatch.setattr(qlinear, "dequantize_int4", tracked(qlinear.dequantize_int4))
    return seen


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("kernel", ["loop", "grouped", "masked", "auto"])
def test_expert_kernels_run_unchanged_on_quantized_layers(kernel, weights, dequantized):
    model = small_model()
    quantize_model(model, weights, 64)
    ffn = model.blocks[0].ffn
    torch.manual_seed(3)
    h = torch.randn(20, 64)
    chosen = experts.route(ffn.router_logits(h), 2)
    d_e = 256 // 4
    mask = torch.zeros(20, 4).scatter_(1, chosen, 1.0).repeat_interleave(d_e, dim=1)
    with torch.no_grad():
        expected = nn.functional.linear(ffn.act(ffn.fc1(h)) * mask, ffn.fc2.weight, ffn.fc2.bias)
        made = dequantized["made"]
        got = experts.experts_forward(ffn, h, experts.topk_pairs(chosen, 4), kernel)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert dequantized["made"] - made == 2  # fc1 once, fc2 once
    assert dequantized["peak"] <= 2


def test_teacher_forcing_holds_one_float_weight_at_a_time(dequantized):
    model = small_model(SMALL.replace(num_experts=0))
    quantize_model(model, "int4", 32)
    with torch.no_grad():
        model(torch.tensor([0, 2]), torch.randn(2, SMALL.seq_len - 1, SMALL.vae_dim))
    assert dequantized["made"] == 11 and dequantized["peak"] == 1  # 5 layers in each of 2 blocks, the head


@pytest.mark.slow
def test_generation_holds_one_float_weight_at_a_time(tiny_int8, dequantized):
    model, info = load_var(tiny_int8)
    vae, _ = load_vae("tiny", model.cfg.patch_nums)
    assert info.quantization == {"weights": "int8", "group_size": None}
    generate(model, vae, torch.tensor([0, 3]), SamplingOptions(), rng=image_generators(0, [0, 1], "cpu"))
    assert dequantized["made"] >= 31 * len(model.cfg.patch_nums)
    assert dequantized["peak"] == 1


# -- quality -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_int8_tiny_predicts_what_the_float_model_predicts(tiny, activations):
    float_model, vae = tiny
    quantized, _ = load_var("tiny")
    quantize_model(quantized, "int8", activations=activations)
    labels = torch.tensor([0, 9])
    ref = generate(float_model, vae, labels, rng=image_generators(5, [0, 1], "cpu"), keep_logits=True)
    forced = ref.tokens  # the float model's tokens, as under teacher forcing
    mine = generate(quantized, vae, labels, rng=image_generators(5, [0, 1], "cpu"), keep_logits=True, forced=forced)
    for si, (a, b) in enumerate(zip(ref.logits, mine.logits)):
        kl = (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean()
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
        assert kl < 0.01 and agree > 0.9, (si, kl.item(), agree.item())
        assert (a - b).abs().mean() < 0.05 * a.abs().mean(), si


# -- files -------------------------------------------------------------------------------------


def test_a_quantized_file_round_trips_and_keeps_the_metadata(tiny_int8, tmp_path, run_cli):
    again = tmp_path / "again.safetensors"
    model, info = load_var(tiny_int8)
    save_model(model, again, user_metadata(info.metadata))
    a, meta_a, _ = read_state_dict(tiny_int8)
    b, meta_b, _ = read_state_dict(again)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a == meta_b and json.loads(meta_a["quantization"]) == {"weights": "int8", "group_size": None}
    assert meta_a["vae"] == "tiny" and meta_a["base_checkpoint_path"] == "tiny"  # sample and eval find both
    assert a["blocks.0.ffn.fc1.qweight"].dtype == torch.int8 and "blocks.0.ffn.fc1.weight" not in a
    assert a["blocks.0.ffn.fc1.scales"].shape == (1024,) and a["blocks.0.attn.proj.bias"].dtype == torch.float32
    assert all(
        a[k].dtype == torch.float32 for k in ("word_embed.weight", "class_emb.weight", "head_nm.ada_lin.1.weight")
    )
    inspected = json.loads(run_cli("inspect", tiny_int8, "--json", "--no-hash").stdout)
    dense = json.loads(run_cli("inspect", "tiny", "--json").stdout)
    assert inspected["quantization"] == {"weights": "int8", "group_size": None}
    assert inspected["parameters"] == dense["parameters"] and inspected["config"] == dense["config"]
    assert 1 < inspected["bytes_per_parameter"] < 1.15 and dense["bytes_per_parameter"] == 2  # tiny ships in fp16


def test_an_int4_actvar_model_round_trips(tmp_path):
    model = small_model()
    quantize_model(model, "int4", 32)
    save_model(model, tmp_path / "q4.safetensors")
    again, info = load_var(tmp_path / "q4.safetensors")
    assert (
        info.kind == "actvar"
        and info.var_config == SMALL
        and info.quantization == {"weights": "int4", "group_size": 32}
    )
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert again.blocks[1].ffn.fc1.qweight.shape == (256, 32) and again.blocks[1].ffn.fc1.scales.shape == (256, 2)
    assert type(again.blocks[1].ffn.router) is nn.Linear
    labels, x = torch.tensor([1, 2]), torch.randn(2, SMALL.seq_len - 1, SMALL.vae_dim)
    torch.testing.assert_close(again(labels, x), model(labels, x))


def test_int8_activations_are_recorded_in_the_file_and_run_from_it(tmp_path, run_cli):
    path = tmp_path / "w8a8.safetensors"
    run_cli("quantize", "tiny", "--weights", "int8", "--activations", "int8", "-o", path)
    scheme = {"weights": "int8", "group_size": None, "activations": "int8"}
    assert json.loads(run_cli("inspect", path, "--json", "--no-hash").stdout)["quantization"] == scheme
    model, info = load_var(path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert info.quantization == scheme and len(layers) == 31
    assert layers.pop("head").activations == "float"  # sampling draws from its logits: float inputs
    assert all(m.activations == "int8" for m in layers.values())
    r = run_cli("quantize", "tiny", "--weights", "int4", "--activations", "int8", "-o", tmp_path / "x.safetensors",
                expect=2)  # fmt: skip
    one_line_error(r, "int8 activations need int8 weights")


def test_a_file_that_lies_about_its_quantization_is_refused(tiny_int8, tmp_path, run_cli):
    sd, meta, _ = read_state_dict(tiny_int8)
    bad = tmp_path / "bad.safetensors"
    save_safetensors(sd, bad, {**meta, "quantization": json.dumps({"weights": "int4", "group_size": 64})})
    with pytest.raises(CheckpointError, match="not stored as int4"):
        load_var(bad)
    save_safetensors(sd, bad, {**meta, "quantization": '{"weights": "int2"}'})
    one_line_error(run_cli("inspect", bad, expect=2), "quantization metadata is invalid")


@pytest.mark.slow
def test_int8_d12_takes_at_most_1_15_bytes_per_parameter(tmp_path, run_cli):
    dense, quantized = tmp_path / "d12.safetensors", tmp_path / "d12-int8.safetensors"
    run_cli("random-weights", "d12", "-o", dense)
    params = json.loads(run_cli("inspect", dense, "--json", "--no-hash").stdout)["parameters"]
    report = json.loads(run_cli("quantize", dense, "--weights", "int8", "-o", quantized, "--json").stdout)
    assert report["parameters"] == params
    assert quantized.stat().st_size / params <= 1.15, quantized.stat().st_size / params
    with safe_open(str(quantized), framework="pt") as f:
        assert json.loads(f.metadata()["quantization"]) == {"weights": "int8", "group_size": None}


# -- commands ----------------------------------------------------------------------------------


def test_training_and_conversion_refuse_a_quantized_model(tiny_int8, tmp_path, run_cli):
    one_line_error(run_cli("moefy", tiny_int8, "-o", tmp_path / "m.safetensors", expect=2), "quantized", "float")
    for stage in ("distill-stage1", "distill-stage2"):
        one_line_error(run_cli(stage, tiny_int8, "--out-dir", tmp_path / stage, expect=2), "quantized")
    one_line_error(run_cli("quantize", tiny_int8, "--weights", "int4", "-o", tmp_path / "q4.safetensors", expect=2),
                   "quantized")  # fmt: skip
    one_line_error(run_cli("quantize", "tiny", "--weights", "int4", "--group-size", "96", "-o",
                           tmp_path / "g.safetensors", expect=2), "does not divide")  # fmt: skip
    one_line_error(run_cli("quantize", "tiny", "--weights", "fp8", "-o", tmp_path / "x.safetensors", expect=2),
                   "int8")  # fmt: skip
    one_line_error(run_cli("quantize", "tiny", "--weights", "int8", "-o", tmp_path / "x.pth", expect=2), ".safetensors")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # every refusal came before any output


@pytest.mark.slow
def test_sample_flops_eval_and_bench_run_on_a_quantized_model(tiny_int8, tmp_path, run_cli):
    summary = json.loads(run_cli("sample", tiny_int8, "--classes", "0,1", "--out", tmp_path / "s", "--json").stdout)
    assert summary["images"] == 2 and (tmp_path / "s" / "grid.png").exists()
    flops = json.loads(run_cli("flops", tiny_int8, "--json").stdout)
    assert flops
    report = json.loads(run_cli("eval", tiny_int8, "--teacher", "tiny", "--num", "2", "--json").stdout)
    assert report["token_agreement"] > 0.9 and report["logit_kl"] < 0.01
    bench = json.loads(run_cli("bench", "tiny", tiny_int8, "--batch-size", "1", "--repeats", "1", "--json").stdout)
    assert bench["savings"] == 0 and bench["speedup"] > 0  # the same FLOPs, another kernel
