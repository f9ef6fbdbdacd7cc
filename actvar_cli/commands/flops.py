"""``actvar flops``: FLOPs of one image's generation, dense and sparse, per scale and component."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ConfigError
from ..models.checkpoint import read_checkpoint
from ..models.config import arch_config, check_expert_count, official_var_config
from ..sparsity.flops import FlopsReport, count_flops, paper_eq12_savings
from ..sparsity.policy import SparsityPolicy
from ..sparsity.stacks import parse_stack, refuse_model_file, stack_policy
from ..train.recipes import Recipe, with_policy_flags
from .loading import resolve
from .result import Result

# The paper's figures (ActVAR, Tables 1, 2, 3 and 6): (arch, scales, token rates, weight rate) -> saving
PAPER_SAVINGS = [
    ("d16", (9, 10), (0.75, 0.75), 0.75, 0.202),
    ("d20", (9, 10), (0.75, 0.75), 0.75, 0.212),
    ("d24", (9, 10), (0.75, 0.75), 0.75, 0.218),
    ("d30", (9, 10), (0.75, 0.75), 0.75, 0.223),
    ("d20", (9, 10), (0.5, 0.25), 0.5, 0.432),
    ("d20", (9, 10), (0.5, 0.75), 0.25, 0.399),
    ("d20", (9, 10), (0.5, 0.5), 0.75, 0.328),
    ("d20", (9, 10), (0.75, 0.5), 0.75, 0.282),
    ("d20", (7, 8), (0.75, 0.75), 0.75, 0.081),
    ("d20", (9, 10), (0.75, 0.75), 1.0, 0.142),  # Table 3: without dynamic weights
    ("d20", (9, 10), (1.0, 1.0), 0.75, 0.094),  # Table 3: without adaptive tokens
]


@dataclass
class FlopsRequest:
    model: str | None = None  # a checkpoint (under its stored policy), or give arch
    arch: str | None = None  # dN or tiny (under the paper's policy)
    experts: int | None = None
    policy_flags: dict = field(default_factory=dict)  # scales, token_rate, token_rates, weight_rate
    method: str | None = None  # another method's policy
    paper_table: bool = False


@dataclass
class FlopsResult(Result):
    report: FlopsReport | None = None
    paper_rows: list[dict[str, Any]] | None = None

    def to_dict(self) -> Any:
        return self.paper_rows if self.paper_rows is not None else self.report.to_dict()


def run(req: FlopsRequest) -> FlopsResult:
    if req.paper_table:
        return FlopsResult(paper_rows=paper_table())
    if (req.model is None) == (req.arch is None):
        raise ConfigError("give a model checkpoint or --arch, not both or neither")
    stored = None
    if req.model is not None:
        _, info = read_checkpoint(resolve(req.model))
        if info.kind == "vqvae":
            raise ConfigError(f"{req.model} is a VQVAE; FLOPs are counted for VAR models")
        cfg, stored = info.var_config, info.policy
    else:
        cfg = arch_config(req.arch)
    if req.experts is not None:
        check_expert_count(cfg.ffn_dim, req.experts)
    if req.method is not None:
        stack = parse_stack(req.method)
        refuse_model_file(stack, "flops")
        policy = stack_policy(stack, len(cfg.patch_nums), stored) or SparsityPolicy.dense()
    else:
        base = Recipe().override(scales=_last_two(cfg))
        base = base.with_policy(stored) if stored is not None else base
        rates = with_policy_flags(base, **req.policy_flags).policy()
        # the stored policy's rules (token rule, guidance, skipped keys) stay; the flags change scales and rates
        policy = rates
        if stored is not None:
            kept = stored.thresholds if rates.scales == stored.scales else ()
            policy = replace(stored, scales=rates.scales, token_rates=rates.token_rates,
                             weight_rates=rates.weight_rates, thresholds=kept)  # fmt: skip
    return FlopsResult(report=count_flops(cfg.replace(num_experts=0), policy, req.experts or cfg.num_experts or 16))


def _last_two(cfg) -> list[int]:
    n = len(cfg.patch_nums)
    return [n - 1, n]


def paper_table() -> list[dict[str, Any]]:
    """Our savings beside the paper's, for every setting the paper reports."""
    rows = []
    for arch, scales, token_rates, weight_rate, paper in PAPER_SAVINGS:
        cfg = official_var_config(int(arch[1:]))
        policy = SparsityPolicy(scales=scales, token_rates=token_rates, weight_rates=(weight_rate,))
        report = count_flops(cfg, policy, 16)
        rows.append(
            {
                "arch": arch,
                "scales": list(scales),
                "token_rates": list(token_rates),
                "weight_rate": weight_rate,
                "paper_savings": paper,
                "our_savings": report.savings,
                "paper_eq12_savings": paper_eq12_savings(cfg, policy, 16),
            }
        )
    return rows
