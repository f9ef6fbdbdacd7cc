"""Fast unit tests of single modules: routing primitives, losses, recipes, argument parsing, Hub targets."""

import pytest
import torch

from actvar_cli import tokens
from actvar_cli.bench import paired_speedup, scale_table, timed_steps
from actvar_cli.cli.parsing import parse_float_list, parse_int_list, parse_set
from actvar_cli.errors import ConfigError, HubError
from actvar_cli.hub import DownloadTarget, parse_target
from actvar_cli.losses import kl_to_target, load_balance, soft_topk
from actvar_cli.policy import SparsityPolicy
from actvar_cli.recipes import Recipe, load_recipe, with_policy_flags
from actvar_cli.runtime import CPU

# -- routing ---------------------------------------------------------------------------


def test_topk_mask_marks_exactly_the_k_largest():
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 4.0, 3.0, 2.0]])
    mask = tokens.topk_mask(scores, 2)
    assert mask.tolist() == [[False, True, False, True], [True, True, False, False]]
    assert mask.dtype == torch.bool and mask.sum().item() == 4


def test_select_tokens_returns_the_k_best_in_sequence_order():
    scores = torch.tensor([[0.0, 9.0, 1.0, 8.0, 7.0]])
    assert tokens.select_tokens(scores, 3).tolist() == [[1, 3, 4]]


def test_straight_through_is_exactly_hard_forward_with_the_soft_gradient():
    soft = torch.tensor([0.2, 0.7, 0.4], requires_grad=True)
    hard = torch.tensor([False, True, True])
    gate = tokens.straight_through(hard, soft)
    assert gate.tolist() == [0.0, 1.0, 1.0]  # exact, not approximately
    (gate * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert soft.grad.tolist() == [1.0, 2.0, 3.0]


# -- losses ----------------------------------------------------------------------------


def test_load_balance_is_one_when_balanced_and_grows_with_concentration():
    n = 4
    balanced_keep = torch.eye(n, dtype=torch.bool)  # each token picks a different expert
    balanced = load_balance(torch.full((n, n), 1 / n), balanced_keep)
    assert balanced.item() == pytest.approx(1.0)
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(n, 1)
    keep = torch.zeros(n, n, dtype=torch.bool)
    keep[:, 0] = True  # every token to expert 0
    assert load_balance(probs, keep).item() == pytest.approx(n * 0.97)


def test_pseudo_label_targets_are_a_softmax_over_the_top_k_only():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    target = soft_topk(scores, 2)
    assert target[0, [0, 3]].tolist() == [0.0, 0.0]
    assert target.sum().item() == pytest.approx(1.0)
    expected = torch.tensor([3.0, 2.0]).softmax(0)
    assert target[0, [1, 2]].tolist() == pytest.approx(expected.tolist())
    sharper = soft_topk(scores, 2, temperature=0.1)
    assert sharper[0, 1] > target[0, 1]


def test_kl_to_target_is_zero_at_the_target_and_finite_on_its_zeros():
    target = soft_topk(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)
    at_target = kl_to_target(target, target.clamp_min(1e-30).log())
    assert at_target.item() == pytest.approx(0.0, abs=1e-6)
    elsewhere = kl_to_target(target, torch.zeros(1, 4))
    assert torch.isfinite(elsewhere) and elsewhere.item() > 0


# -- recipes and policies -------------------------------------------------------------------


def test_with_policy_flags():
    base = Recipe()
    assert with_policy_flags(base, token_rate=0.5).token_rates == [0.5, 0.5]
    new_scales = with_policy_flags(base, scales=[8, 9, 10])
    assert new_scales.scales == [8, 9, 10] and new_scales.token_rates == [0.75] * 3
    assert with_policy_flags(base, weight_rate=0.25).policy().weight_rates == (0.25, 0.25)
    with pytest.raises(ConfigError, match="not both"):
        with_policy_flags(base, token_rate=0.5, token_rates=[0.5, 0.5])
    with pytest.raises(ConfigError, match="2 sparse scales but 3 token rates"):
        with_policy_flags(base, token_rates=[0.5, 0.5, 0.5])


def test_recipe_validation_names_the_bad_key():
    with pytest.raises(ConfigError, match="betas"):
        Recipe().override(betas=0.9).validate()
    with pytest.raises(ConfigError, match="checkpoint_every = 0"):
        Recipe().override(checkpoint_every=0).validate()
    with pytest.raises(ConfigError, match="unknown recipe key"):
        Recipe().override(learning_rate=1)
    load_recipe("d16").validate()


def test_policy_rates_and_counts():
    p = SparsityPolicy(scales=(9, 10), token_rates=(0.75,), weight_rates=(0.75,))
    assert p.tokens_kept(8, 169) == 127 and p.tokens_kept(9, 256) == 192 and p.tokens_kept(0, 1) == 1
    assert p.experts_kept(9, 16) == 12 and p.experts_kept(3, 16) == 16
    assert SparsityPolicy.from_dict(p.to_dict()) == p


# -- command-line values -----------------------------------------------------------------------


def test_int_lists_and_ranges():
    assert parse_int_list("0,7,42", "--classes") == [0, 7, 42]
    assert parse_int_list("3-5,9", "--classes") == [3, 4, 5, 9]
    for bad in ("1,,2", "a", "5-3", ""):
        with pytest.raises(ConfigError, match="not a list of integers"):
            parse_int_list(bad, "--classes")
    assert parse_float_list("0.5,0.75", "--token-rates") == [0.5, 0.75]
    with pytest.raises(ConfigError):
        parse_float_list("0.5,", "--token-rates")


def test_set_pairs_are_read_as_yaml():
    assert parse_set(["teacher_top_k=600", "betas=[0.9, 0.99]", "data=teacher"]) == {
        "teacher_top_k": 600,
        "betas": [0.9, 0.99],
        "data": "teacher",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["lr"])


# -- Hub targets ---------------------------------------------------------------------------------


def test_parse_target():
    assert parse_target("d16") == DownloadTarget("FoundationVision/var", "var_d16.pth")
    assert parse_target("VAR_D30") == DownloadTarget("FoundationVision/var", "var_d30.pth")
    assert parse_target("vae") == DownloadTarget("FoundationVision/var", "vae_ch160v4096z32.pth")
    assert parse_target("me/actvar-d16") == DownloadTarget("me/actvar-d16", None)
    assert parse_target("me/actvar-d16:model.safetensors") == DownloadTarget("me/actvar-d16", "model.safetensors")
    for bad in ("me/my model", "nobody", "a/b/c", "/x", "me/"):
        with pytest.raises(HubError):
            parse_target(bad)


def test_paired_speedup_compares_each_run_with_its_neighbour():
    """A machine that slows down in the middle of a benchmark must not decide the ratio."""
    dense, sparse = [1.0, 2.0, 4.0], [0.5, 2.0, 2.0]  # medians 2.0 and 2.0; pairs 2x, 1x, 2x
    assert paired_speedup(dense, sparse) == 2.0
    with pytest.raises(ValueError):
        paired_speedup([1.0], [1.0, 2.0])


def test_the_per_scale_bound_is_the_speedup_of_steps_at_their_flops_ratio():
    from actvar_cli.config import arch_config
    from actvar_cli.flops import count_flops

    flops = count_flops(arch_config("tiny"), SparsityPolicy(scales=(6, 7)))
    ideal = flops.dense_flops / flops.sparse_flops
    dense_steps = [sum(s.dense.values()) * 1e-9 for s in flops.scales]  # time proportional to FLOPs
    at_ratio = [sum(s.sparse.values()) * 1e-9 for s in flops.scales]
    for outside in (0.0, 0.05):
        steps = {"dense": [dense_steps] * 3, "sparse": [at_ratio] * 3}
        table = scale_table(sum(dense_steps) + outside, steps, flops, ideal)
        assert table["outside_steps_s"] == pytest.approx(outside, abs=1e-12)
        assert [r["speedup"] for r in table["scales"]] == pytest.approx([r["flops_ratio"] for r in table["scales"]])
        assert table["bound_speedup"] == pytest.approx((sum(dense_steps) + outside) / (sum(at_ratio) + outside))
    assert table["bound_speedup"] < ideal  # work outside the steps holds it back
    assert scale_table(sum(dense_steps), steps, flops, ideal)["bound_efficiency"] == pytest.approx(1.0)


def test_timing_steps_leaves_a_compiled_step_in_place():
    class Model:
        def generation_step(self, x):
            return x + 1

    compiled, plain = Model(), Model()
    compiled.generation_step = step = lambda x: x + 2  # what compile_steps does
    for model, expected in ((compiled, 3), (plain, 2)):
        with timed_steps(model, CPU) as seconds:
            assert model.generation_step(1) == expected
        assert len(seconds) == 1
    assert compiled.generation_step is step and "generation_step" not in vars(plain)


def test_plot_labels_name_a_model_file_by_its_run():
    from actvar_cli.plots import short_name

    assert short_name("actvar:runs/quality/default-s2/model.safetensors") == "actvar:default-s2"
    assert short_name("actvar:runs/quality/aggressive.safetensors") == "actvar:aggressive"
    assert short_name("fastvar:0.5") == "fastvar:0.5"
