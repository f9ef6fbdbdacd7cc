"""Every method on one yardstick: each counts its FLOPs as torch does, reproduces the dense model at
its no-op setting, and really skips the work it claims to skip."""

import pytest
import torch
from conftest import PARITY
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from actvar_cli.convert.method_models import MethodBuilder
from actvar_cli.errors import ConfigError
from actvar_cli.generation.sampling import SamplingOptions, generate, image_generators
from actvar_cli.measure.compare import experts_per_token
from actvar_cli.models.checkpoint import load_var
from actvar_cli.sparsity.blocks import GenerationState
from actvar_cli.sparsity.flops import count_flops
from actvar_cli.sparsity.methods import parse_method

pytestmark = pytest.mark.shared  # the parity model: 10 scales, like the official ones

METHODS = ["dense", "actvar", "actvar-tokens", "actvar-experts", "static-experts:0.5", "fixed-tokens:0.5",
           "fastvar:0.5", "dmoe:0.5", "skip-last:1", "cfg-off:2", "cfg-sharp:2", "ear:0.5"]  # fmt: skip
STACKS = ["cfg-off:1+fastvar:0.5", "dmoe:0.5+fixed-tokens:0.5+skipped-kv", "fixed-tokens:0.5+skipped-kv",
          "actvar+cfg-off:1", "static-experts:0.5+ear:0.5+cfg-off:1", "fastvar:0.25+int8",
          "cfg-sharp:2+w8a8"]  # fmt: skip
NO_OP = ["static-experts:1", "fixed-tokens:1", "fastvar:0", "dmoe:0", "skip-last:0", "cfg-off:0", "cfg-sharp:0",
         "ear:1"]  # fmt: skip


@register_flop_formula(torch.ops.aten._int_mm)
def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """w8a8's int8 products: the counter knows float matmuls only, and a multiply-add is one either way."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


@pytest.fixture(scope="module")
def builder(d2):
    _, vae = d2
    return MethodBuilder(load_var(PARITY / "var_d2.pth")[0], vae, calib_images=2)


def run(method, vae, labels=(3, 500), opts=SamplingOptions(), **kw):
    state = GenerationState(record_sublayers=method.policy is not None and method.policy.token_rule == "far-from-mean",
                            count_pairs=True, kernel="loop")  # fmt: skip  # only the chosen experts run
    rng = image_generators(0, list(range(len(labels))), "cpu")
    gen = generate(method.model, vae, torch.tensor(labels), opts, rng=rng, policy=method.policy, state=state, **kw)
    return gen, state


@pytest.mark.slow
@pytest.mark.parametrize("spec", METHODS + STACKS)
def test_each_method_counts_its_flops_as_torch_does(builder, d2, spec):
    _, vae = d2
    m = builder.build(spec)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # math SDPA is visible to the counter
        _, state = run(m, vae)
    cfg = m.model.cfg
    per_token = experts_per_token(m, state.pairs_run, 2) if m.policy else None
    report = count_flops(cfg.replace(num_experts=0), m.policy, cfg.num_experts or 16, per_token)
    expected = 2 * report.sparse_flops
    assert abs(fc.get_total_flops() - expected) / expected < 0.01, (spec, fc.get_total_flops(), expected)
    if spec != "dense":
        assert report.savings > 0.02, spec  # every method saves something at these settings


@pytest.mark.slow
@pytest.mark.parametrize("spec", NO_OP)
def test_each_method_at_its_no_op_setting_reproduces_the_dense_model(builder, d2, spec):
    _, vae = d2
    greedy = SamplingOptions(top_k=1, top_p=0.0)
    dense, _ = run(builder.build("dense"), vae, opts=greedy, keep_logits=True)
    same, _ = run(builder.build(spec), vae, opts=greedy, keep_logits=True)
    for a, b in zip(dense.tokens, same.tokens):
        assert torch.equal(a, b), spec
    torch.testing.assert_close(torch.cat(same.guided, 1), torch.cat(dense.guided, 1), atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_token_methods_keep_only_their_tokens_in_the_kv_cache(builder, d2):
    """A skipped token is neither a query nor a key: the cache holds K_t tokens of a sparse scale."""
    _, vae = d2
    for spec in ("fastvar:0.5", "ear:0.5", "fixed-tokens:0.5"):
        m = builder.build(spec)
        made = []
        original = m.model.new_cache
        m.model.new_cache = lambda *a, original=original, made=made: made.append(original(*a)) or made[-1]
        run(m, vae)
        kept = sum(m.policy.tokens_kept(si, pn * pn) for si, pn in enumerate(m.model.cfg.patch_nums))
        assert kept < 680 and all(c.length == c.capacity == kept for c in made[0]), spec  # 680 when dense


def test_skipping_and_unguided_scales_change_the_work_done(builder, d2):
    _, vae = d2
    gen, _ = run(builder.build("skip-last:2"), vae, keep_logits=True)
    assert len(gen.tokens) == 8 and gen.f_hat.shape == (2, 32, 16, 16)
    gen, _ = run(builder.build("cfg-off:2"), vae, keep_logits=True)
    assert [r.shape[0] for r in gen.logits] == [4] * 8 + [2, 2]  # both CFG rows, then the conditional only


def test_sharpened_scales_sample_from_the_conditional_logits_times_1_plus_t(builder, d2):
    """cfg-sharp: where guidance is off, (1 + t) c, the guided logits when the unconditional ones are flat."""
    _, vae = d2
    opts = SamplingOptions()
    plain, _ = run(builder.build("cfg-off:2"), vae, keep_logits=True)
    sharp, _ = run(builder.build("cfg-sharp:2"), vae, keep_logits=True)
    assert [r.shape[0] for r in sharp.logits] == [4] * 8 + [2, 2]  # the same work as cfg-off:2
    for si in range(8):  # guided scales: untouched
        assert torch.equal(sharp.guided[si], plain.guided[si]) and torch.equal(sharp.tokens[si], plain.tokens[si])
    for si in (8, 9):
        t = opts.cfg * si / 9
        assert torch.equal(sharp.guided[si], sharp.logits[si].float() * (1 + t))
    assert not torch.equal(sharp.tokens[9], plain.tokens[9])  # a sharper distribution draws other tokens


def test_method_names_and_parameters():
    assert parse_method("fastvar") == ("fastvar", "0.5") and parse_method("dmoe:0.8") == ("dmoe", "0.8")
    assert parse_method("actvar:runs/s2/model.safetensors") == ("actvar", "runs/s2/model.safetensors")
    with pytest.raises(ConfigError, match="unknown method"):
        parse_method("quantize:4")
    with pytest.raises(ConfigError, match="empty parameter"):
        parse_method("fastvar:")


def test_bad_method_parameters(builder):
    for spec, message in (("fastvar:1", "keeps some tokens"), ("ear:1.5", "one value in"), ("skip-last:10", "from 0"),
                          ("static-experts:x", "not a number")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            builder.build(spec)
