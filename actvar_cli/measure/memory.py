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
from ..generation.sampling import DECODE_CHUNK, cached_tokens
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
    later: tuple[str, ...] = ()  # components live only once the rest (but the weights) is freed

    @property
    def total(self) -> float:
        """The peak: the weights, and the larger of the two phases (generation, then the decode)."""
        counted = {k: v for k, v in self.components.items() if k != "cfg_doubling"}
        later = sum(counted.pop(k) for k in self.later if k in counted)
        weights = counted.pop("weights", 0.0)
        return weights + max(sum(counted.values()), later)

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


def weight_bytes(cfg: VARConfig, quantization: dict | None = None) -> float:
    """Bytes of a VAR's weights: float32, or the quantized layers (``actvar quantize``) at their width
    with their scales, and everything else in float32."""
    total = var_parameters(cfg) * FP32_MASTER
    if not quantization:
        return total
    C, F = cfg.embed_dim, cfg.ffn_dim
    layers = [(3 * C, C), (C, C), (F, C), (C, F)] + ([] if cfg.shared_aln else [(6 * C, C)])  # (out, in)
    layers = layers * cfg.depth + [(cfg.vocab_size, C)]
    group = quantization.get("group_size") or 0
    for out_f, in_f in layers:
        if quantization["weights"] == "int8":
            stored = out_f * in_f + out_f * 4  # int8 values, a float32 scale per output channel
        else:
            stored = out_f * in_f / 2 + out_f * (in_f // group) * 4  # two int4 values a byte, a scale per group
        total += stored - out_f * in_f * FP32_MASTER
    return total


def kv_bytes(cfg: VARConfig, *, rows: int, tokens: int, dtype: str, bits: int = 0) -> float:
    """The preallocated KV cache: keys and values of every cached token of every block."""
    elements = 2.0 * cfg.depth * rows * tokens * cfg.embed_dim
    if bits == 8:  # int8 values and a float32 scale per (row, head, token)
        return elements + 2.0 * cfg.depth * rows * tokens * cfg.num_heads * 4
    return elements * ACT_BYTES[dtype]


def generation_plan(
    cfg: VARConfig,
    *,
    batch_size: int,
    policy: SparsityPolicy | None = None,
    dtype: str = "fp32",
    quantization: dict | None = None,
    vae: VAEConfig | None = None,
    materialised_scores: bool = True,
) -> MemoryPlan:
    """Bytes that generating ``batch_size`` images needs (one process)."""
    act = ACT_BYTES[dtype]
    C, B = cfg.embed_dim, batch_size
    rows = 2 * B  # conditional and unconditional rows while guided
    L = cached_tokens(cfg.patch_nums, policy)
    n = cfg.patch_nums[-1] ** 2  # the largest step
    plan = MemoryPlan()
    plan.components["weights"] = weight_bytes(cfg, quantization) + (vae_parameters(vae) * 4 if vae else 0)
    plan.components["kv_cache"] = kv_bytes(cfg, rows=rows, tokens=L, dtype=dtype, bits=policy.kv_bits if policy else 0)
    scores = rows * cfg.num_heads * n * L * 4 if materialised_scores else 0
    hidden = rows * n * (3 * C + 2 * cfg.ffn_dim + 4 * C) * act  # qkv, FFN hidden before/after GELU, x copies
    if policy is not None and policy.kv_bits:
        hidden += 2 * rows * L * C * act  # one block's keys and values, dequantized while it attends
    if quantization:
        hidden += max(cfg.ffn_dim * C, cfg.vocab_size * C) * FP32_MASTER  # one layer's weight, dequantized
    sampler = B * n * cfg.vocab_size * 4 * 4  # guided logits, filtered, scattered probabilities, their CDF
    plan.components["activations"] = scores + hidden + rows * n * cfg.vocab_size * 4 + sampler
    if vae is not None:
        plan.components["decode"] = decode_bytes(vae, B)
        plan.later = ("decode",)
        plan.notes["decode"] = "after generation, whose KV cache and activations are freed by then"
    plan.components["cfg_doubling"] = plan.components["kv_cache"] / 2 + (scores + hidden) / 2
    plan.notes["cfg_doubling"] = "included above: what the unconditional rows add to the KV cache and activations"
    return plan


def vae_parameters(vae: VAEConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in VQVAE(vae).parameters())


def decode_bytes(vae: VAEConfig, batch_size: int) -> float:
    """The VQVAE decoder at full resolution: five live float32 maps of its full-size level at the
    peak (measured on the CPU: the block's input, its normalised copy, the convolution's output, and
    the upsampling's input and output) for the images decoded at once, and the images themselves
    (the chunks and their concatenation)."""
    side = vae.patch_nums[-1] * vae.stride
    chunk = min(batch_size, DECODE_CHUNK)  # decode_images decodes this many at once
    return 5.0 * chunk * vae.ch * vae.ch_mult[0] * side * side * 4 + 2 * batch_size * 3 * side * side * 4


def training_plan(
    cfg: VARConfig,
    *,
    batch_size: int,
    stage: int,
    trainable: float,
    precision: str = "fp32",
    materialised_scores: bool = False,
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
    scores = B * cfg.num_heads * L * L * 4 if materialised_scores else 0  # a GPU's fused attention keeps none
    per_block = B * L * (8 * C + 2 * cfg.ffn_dim) * act + scores
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
