"""The paper's losses as read here, and recipes with flags over their keys."""

import pytest
import torch

from actvar_cli.errors import ConfigError
from actvar_cli.train.losses import kl_to_target, load_balance, soft_topk
from actvar_cli.train.recipes import Recipe, load_recipe, with_policy_flags


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
