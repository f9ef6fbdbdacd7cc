"""Token choices and policies: exact top-k masks, straight-through gates, rates and counts."""

import torch

from actvar_cli.sparsity import tokens
from actvar_cli.sparsity.policy import SparsityPolicy


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


def test_policy_rates_and_counts():
    p = SparsityPolicy(scales=(9, 10), token_rates=(0.75,), weight_rates=(0.75,))
    assert p.tokens_kept(8, 169) == 127 and p.tokens_kept(9, 256) == 192 and p.tokens_kept(0, 1) == 1
    assert p.experts_kept(9, 16) == 12 and p.experts_kept(3, 16) == 16
    assert SparsityPolicy.from_dict(p.to_dict()) == p
