"""``actvar memory``: what generation (or a distillation stage) needs in memory, component by component.

A model file is planned as it would run (its policy, its quantization); an architecture (``--arch``)
as the dense model, or as a stack (``--method``) would make it. Nothing is loaded but the file's
header and shapes: d36 is planned on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..convert.method_models import CONVERTED
from ..errors import ConfigError
from ..measure.memory import MemoryPlan, generation_plan, training_plan
from ..models.checkpoint import read_checkpoint
from ..models.config import BUILTIN_NAME, REFERENCE_VAE_CONFIG, VAEConfig, arch_config
from ..quant.apply import make_scheme
from ..sparsity.experts import check_expert_count
from ..sparsity.stacks import parse_stack, refuse_model_file, stack_policy
from ..train.recipes import pick_recipe
from .loading import resolve
from .result import Result


@dataclass
class MemoryRequest:
    model: str | None = None  # a checkpoint, or give arch
    arch: str | None = None  # dN or tiny
    batch_size: int = 8  # images (generation) or images per process and micro-step (training)
    method: str | None = None  # a method or stack the model runs with
    dtype: str = "fp32"  # fp32, bf16 or fp16 activations (autocast)
    train: str | None = None  # stage1 or stage2: plan a distillation stage instead of generation
    experts: int = 16  # experts per FFN when a stack converts the dense model
    shard: int = 1  # FSDP full sharding over this many processes (training)
    device: str = "cuda"  # cuda: fused attention keeps no score matrix; cpu: it does


@dataclass
class MemoryResult(Result):
    what: str
    plan: MemoryPlan

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, **self.plan.to_dict()}


def run(req: MemoryRequest) -> MemoryResult:
    _check(req)
    cfg, policy, quantization, name = _model(req)
    if req.train:
        stage = int(req.train[-1])
        plan = training_plan(
            cfg, batch_size=req.batch_size, stage=stage, trainable=_trainable(cfg, stage), precision=req.dtype,
            materialised_scores=req.device == "cpu",
        )  # fmt: skip
        plan = _sharded(plan, req.shard)
        what = f"{name}, distill-stage{stage}, batch {req.batch_size} per process" + (
            f", FSDP over {req.shard} processes" if req.shard > 1 else ""
        )
        return MemoryResult(what, plan)
    vae = REFERENCE_VAE_CONFIG if cfg.dense == arch_config(BUILTIN_NAME) else VAEConfig(patch_nums=cfg.patch_nums)
    plan = generation_plan(
        cfg, batch_size=req.batch_size, policy=policy, dtype=req.dtype, quantization=quantization, vae=vae,
        materialised_scores=req.device == "cpu",
    )  # fmt: skip
    return MemoryResult(f"{name}, generation of {req.batch_size} images ({req.dtype}, {req.device})", plan)


def _check(req: MemoryRequest) -> None:
    if (req.model is None) == (req.arch is None):
        raise ConfigError("give a model checkpoint or --arch, not both or neither")
    if not 1 <= req.batch_size <= 1 << 20:
        raise ConfigError(f"--batch-size {req.batch_size}: must be from 1 to {1 << 20}")
    if req.dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--dtype {req.dtype!r}", "use fp32, bf16 or fp16")
    if req.train not in (None, "stage1", "stage2"):
        raise ConfigError(f"--train {req.train!r}", "use stage1 or stage2")
    if req.device not in ("cuda", "cpu"):
        raise ConfigError(f"--device {req.device!r}", "use cuda or cpu")
    if req.shard < 1:
        raise ConfigError(f"--shard {req.shard}: must be 1 or more processes")
    if req.shard > 1 and not req.train:
        raise ConfigError(f"--shard {req.shard}: FSDP shards training", "add --train stage1 or stage2")


def _model(req: MemoryRequest):
    """(config, policy, quantization, name) of the file or architecture, under the stack if given."""
    if req.model is not None:
        _, info = read_checkpoint(resolve(req.model))
        if info.var_config is None:
            raise ConfigError(f"{req.model} is a VQVAE; memory is planned for VAR models")
        cfg, policy, quant, name = info.var_config, info.policy, info.quantization, info.name
    else:
        cfg, policy, quant, name = arch_config(req.arch), None, None, req.arch
    if req.method:
        stack = parse_stack(req.method)
        refuse_model_file(stack, "memory")
        if any(f in CONVERTED for f in stack.families) and not cfg.num_experts:
            check_expert_count(cfg.ffn_dim, req.experts)
            cfg = cfg.replace(num_experts=req.experts)
        policy = stack_policy(stack, len(cfg.patch_nums), policy)
        if stack.quantization_scheme:
            weights, activations = stack.quantization_scheme
            quant = make_scheme(weights, activations=activations)
        name = f"{name} + {req.method}"
    return cfg, policy, quant, name


def _trainable(cfg, stage: int) -> float:
    """Parameters a stage trains: routers and selectors, or the recipe's deltas (or the paper's share)."""
    C, N, V = cfg.embed_dim, cfg.num_experts or 16, cfg.vocab_size
    if stage == 1:
        return cfg.depth * (C * N + N + C + 1)
    r = pick_recipe(None, cfg).delta_rank
    if r:
        return cfg.depth * r * 6 * C + r * (C + V)  # A and B of qkv (r x C, 3C x r) and proj, and of the head
    return cfg.depth * (4 * C * C + 2 * C * cfg.ffn_dim) + C * V  # attention, experts and head


def _sharded(plan: MemoryPlan, shard: int) -> MemoryPlan:
    """FSDP full sharding: the student's parameters, gradients and AdamW state split over the
    processes. The frozen teacher is not wrapped (only the student goes through Accelerate's
    prepare), so every process holds it whole; activations stay per process."""
    if shard == 1:
        return plan
    for k in ("student", "gradients", "adamw_state"):
        plan.components[k] /= shard
    plan.notes["sharding"] = (
        f"FSDP FULL_SHARD over {shard} processes: the student's weights and optimizer state / {shard};"
        " the teacher stays whole on every process"
    )
    return plan
