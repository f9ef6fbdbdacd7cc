"""What a generation or a distillation run needs in memory, component by component, before it runs.

The plan counts the tensors the code makes: weights (at their stored width: fp32, or int8/int4 with
their scales), the KV cache (preallocated once per generation: every cached token of every block,
both CFG rows while guided), the activations of the largest scale step (the attention scores where
the backend materialises them, the FFN's hidden layer, the logits and the sampler's buffers), and the
VQVAE decode at full resolution. ``cfg_doubling`` says how much of it the unconditional rows add.
Commands use it to refuse a batch that cannot fit before allocating anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..generation.sampling import cached_tokens
from ..models.vqvae import VQVAE
from ..sparsity.policy import SparsityPolicy

if TYPE_CHECKING:
    from ..models.config import VAEConfig, VARConfig

GB = 2**30
ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32_MASTER = 4  # bytes of a float32 parameter, gradient or Adam moment


@dataclass
class MemoryPlan:
    components: dict[str, float] = field(default_factory=dict)  # name -> bytes
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(v for k, v in self.components.items() if k != "cfg_doubling")

    def to_dict(self) -> dict:
        return {
            "total_gb": self.total / GB,
            "components": {k: v / GB for k, v in self.components.items()},
            "notes": self.notes,
        }


def var_parameters(cfg: VARConfig) -> int:
    """Parameters of a VAR (or ActVAR: routers and selectors) of ``cfg``, counted from the shapes."""
    C, D, F, N = cfg.embed_dim, cfg.depth, cfg.ffn_dim, cfg.num_experts
    block = 3 * C * C + 2 * C + C * C + C + C * F + F + F * C + C + cfg.num_heads  # attention, FFN
    block += 0 if cfg.shared_aln else C * 6 * C + 6 * C  # AdaLN
    block += (C * N + N + C + 1) if N else 0  # router and selector
    shared = 6 * C * C + 6 * C if cfg.shared_aln else 0
    embed = cfg.vae_dim * C + C + (cfg.num_classes + 1) * C + cfg.seq_len * C + cfg.patch_nums[0] ** 2 * C
    embed += len(cfg.patch_nums) * C
    head = C * 2 * C + 2 * C + C * cfg.vocab_size + cfg.vocab_size
    return D * block + shared + embed + head


def generation_plan(
    cfg: VARConfig,
    *,
    batch_size: int,
    policy: SparsityPolicy | None = None,
    dtype: str = "fp32",
    weight_bytes: float = FP32_MASTER,
    vae: VAEConfig | None = None,
    materialised_scores: bool = True,
) -> MemoryPlan:
    """Bytes that generating ``batch_size`` images needs; ``weight_bytes`` per VAR parameter."""
    act = ACT_BYTES[dtype]
    C, D, B = cfg.embed_dim, cfg.depth, batch_size
    rows = 2 * B  # conditional and unconditional rows while guided
    L = cached_tokens(cfg.patch_nums, policy)
    n = cfg.patch_nums[-1] ** 2  # the largest step
    plan = MemoryPlan()
    plan.components["weights"] = var_parameters(cfg) * weight_bytes + (vae_parameters(vae) * 4 if vae else 0)
    plan.components["kv_cache"] = 2.0 * D * rows * L * C * act  # preallocated for the whole pyramid
    scores = rows * cfg.num_heads * n * L * 4 if materialised_scores else 0
    hidden = rows * n * (3 * C + 2 * cfg.ffn_dim + 4 * C) * act  # qkv, FFN hidden before/after GELU, x copies
    sampler = B * n * cfg.vocab_size * 4 * 4  # guided logits, filtered, scattered probabilities, their CDF
    plan.components["activations"] = scores + hidden + rows * n * cfg.vocab_size * 4 + sampler
    if vae is not None:
        plan.components["decode"] = decode_bytes(vae, B)
    plan.components["cfg_doubling"] = plan.components["kv_cache"] / 2 + (scores + hidden) / 2
    plan.notes["cfg_doubling"] = "included above: what the unconditional rows add to the KV cache and activations"
    return plan


def vae_parameters(vae: VAEConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in VQVAE(vae).parameters())


def decode_bytes(vae: VAEConfig, batch_size: int) -> float:
    """The VQVAE decoder at full resolution: about four live float32 maps of its widest full-size level."""
    side = vae.patch_nums[-1] * vae.stride
    return 4.0 * batch_size * vae.ch * vae.ch_mult[0] * side * side * 4


def training_plan(
    cfg: VARConfig,
    *,
    batch_size: int,
    stage: int,
    trainable: float,
    precision: str = "fp32",
) -> MemoryPlan:
    """Bytes that one process of a distillation stage needs: the student's parameters, gradients
    and AdamW moments of its ``trainable`` share, the frozen teacher, and the activations that
    backpropagation keeps (teacher forcing over the whole sequence, every block)."""
    act = ACT_BYTES["bf16" if precision == "bf16" else "fp32"]
    params = var_parameters(cfg)
    L, C, B = cfg.seq_len, cfg.embed_dim, batch_size
    plan = MemoryPlan()
    plan.components["student"] = params * FP32_MASTER
    plan.components["gradients"] = trainable * FP32_MASTER
    plan.components["adamw_state"] = 2 * trainable * FP32_MASTER
    plan.components["teacher"] = var_parameters(cfg.dense) * FP32_MASTER
    per_block = B * L * (8 * C + 2 * cfg.ffn_dim) * act + B * cfg.num_heads * L * L * 4
    plan.components["activations"] = cfg.depth * per_block + 3 * B * L * cfg.vocab_size * 4  # + logits, softmax
    plan.notes["activations"] = f"stage {stage}: kept for backpropagation, one process, batch {batch_size}"
    return plan


def available_bytes(device: torch.device) -> float:
    """Free memory where the work runs: the GPU's free memory, or the system's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        import psutil  # installed with accelerate
    except ImportError:  # pragma: no cover
        return float("inf")
    return float(psutil.virtual_memory().available)


def check_fits(plan: MemoryPlan, device: torch.device, what: str) -> None:
    """Refuse, before allocating, a run that the machine cannot hold."""
    free = available_bytes(device)
    if plan.total > free:
        raise ConfigError(
            f"{what} needs about {plan.total / GB:.1f} GiB of memory and {free / GB:.1f} GiB are free",
            "use a smaller --batch-size (actvar memory shows where it goes)",
        )
