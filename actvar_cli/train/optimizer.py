"""What each distillation stage trains, its optimizer, and its learning-rate schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..models.var import VAR
from .recipes import Recipe

STAGE2_TRAINABLE = ("ffn.fc1.", "ffn.fc2.", "attn.", "head.")  # the paper's stage 2, without deltas


def select_trainable(model: VAR, stage: int, delta_rank: int = 0, seed: int = 0) -> list[torch.nn.Parameter]:
    """Stage 1: the routers and selectors the model's policy uses (under DDP an unused one is an error).
    Stage 2: the sparse-scale deltas when ``delta_rank`` (or the model has them), else the paper's
    experts (fc1/fc2), attention and head at every scale; and the dropped-expert means, if any."""
    if stage == 2 and (delta_rank or model.cfg.delta_rank):
        chosen = set(model.add_deltas(delta_rank or model.cfg.delta_rank, seed)) | set(expert_means(model))
    elif stage == 1:
        chosen = set(_routing_parameters(model))
    else:
        chosen = {p for n, p in model.named_parameters() if _inner(n).startswith(STAGE2_TRAINABLE)}
        chosen |= set(expert_means(model))
    for p in model.parameters():
        p.requires_grad_(p in chosen)
    return [p for p in model.parameters() if p in chosen]


def expert_means(model: VAR) -> list[torch.nn.Parameter]:
    """The FFNs' dropped-expert means, where the policy drops experts (they act only there)."""
    segments = model.sparse_segments(model.policy)
    if not any(s.keep_experts < model.cfg.num_experts for s in segments):
        return []
    return [b.ffn.dropped_mean for b in model.blocks if b.ffn.dropped_mean is not None]


def _inner(name: str) -> str:
    return name.split(".", 2)[-1] if name.startswith("blocks.") else name


def _routing_parameters(model: VAR) -> list[torch.nn.Parameter]:
    """Routers where experts are pruned by the router; every block's selector for the selector rule,
    block 0's for the fixed rule (its one choice), none for the others."""
    policy, segments = model.policy, model.sparse_segments(model.policy)
    routed = any(s.keep_experts < model.cfg.num_experts for s in segments) and policy.expert_rule == "router"
    selecting = any(s.keep_tokens < s.length for s in segments)
    params = []
    for i, block in enumerate(model.blocks):
        if routed:
            params += list(block.ffn.router.parameters())
        if selecting and (policy.token_rule == "selector" or (policy.token_rule == "fixed" and i == 0)):
            params += list(block.selector.parameters())
    if not params:
        raise ConfigError("stage 1 has nothing to train: the policy uses no router and no selector")
    return params


def lr_lambda(total: int, warmup: float, lr_end: float) -> Callable[[int], float]:
    """Upstream VAR's schedule: linear warm-up from 0.5% of the peak, then linear decay to ``lr_end``."""
    wp = max(1, round(warmup * total))

    def f(step: int) -> float:
        if step < wp:
            return 0.005 + (1 - 0.005) * step / wp
        return 1 - (1 - lr_end) * min(1.0, (step - wp) / max(1, total - wp))

    return f


def make_optimizer(student: VAR, stage: int, recipe: Recipe) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = select_trainable(student, stage, recipe.delta_rank, recipe.seed)
    means = set(expert_means(student))  # means, not weights: no decay toward zero
    decay = [p for p in params if p.ndim >= 2 and p not in means]
    no_decay = [p for p in params if p.ndim < 2 or p in means]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.stage_lr(stage),
        betas=tuple(recipe.betas),
    )
    return params, optimizer
