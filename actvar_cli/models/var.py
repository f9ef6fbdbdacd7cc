"""The VAR transformer (next-scale prediction), written here with upstream's state-dict names.

One network serves both the dense VAR and ActVAR. An ActVAR model (``cfg.num_experts > 0``)
has two extra linear layers per block: ``ffn.router`` (C -> N experts) and ``selector``
(C -> 1 token score). Its FFN weights are the dense ones with hidden neurons permuted so
that expert ``e`` is the contiguous slice ``fc1.weight[e*d_e:(e+1)*d_e]``; with every expert
and every token active it computes exactly the dense function.

Sparse scales (a ``SparsityPolicy``) run through ``sparse.py``: ``generation_step`` hands
each block the scale's plan, and ``forward_train`` expresses the same choices as masks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..components import component
from ..errors import ConfigError
from ..sparsity import blocks as sparse
from ..sparsity.policy import SparseSegment, SparsityPolicy
from .config import VARConfig
from .deltas import LowRankDelta, ScaleSwitch
from .kv_cache import LayerCache


class FFN(nn.Module):
    """fc1 -> tanh-GELU -> fc2; with ``num_experts`` it also holds the router, and with
    ``expert_means`` each expert's mean output over the tokens that do not run it (added in its
    place: a dropped expert's output is rarely zero on average, docs/actvar.md)."""

    def __init__(self, dim: int, hidden: int, num_experts: int = 0, expert_means: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.num_experts = num_experts
        self.router = nn.Linear(dim, num_experts) if num_experts else None
        self.dropped_mean = nn.Parameter(torch.zeros(num_experts, dim)) if num_experts and expert_means else None

    def dropped_output(self, chosen_TN: torch.Tensor) -> torch.Tensor | float:
        """What the unchosen experts add on average: (T, C), or 0 without expert means."""
        if self.dropped_mean is None:
            return 0.0
        return (1 - chosen_TN).to(self.dropped_mean.dtype) @ self.dropped_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with component("ffn"):
            return self.fc2(self.act(self.fc1(x)))

    def router_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The router's scores, in float32 even under autocast: a choice must not hinge on bf16 rounding."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            return F.linear(h.float(), self.router.weight.float(), self.router.bias.float())


def linear_with_bias(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``layer``'s product with another bias than its own; a quantized layer (quant/linear.py) runs
    its own kernel, which may take int8 inputs."""
    return F.linear(x, layer.weight, bias) if type(layer) is nn.Linear else layer(x, bias)


class SelfAttention(nn.Module):
    """Multi-head attention; with ``attn_l2_norm`` q and k are unit vectors and q is scaled
    by a learnable per-head factor exp(min(s, log 100)) (upstream's ``scale_mul_1H11``)."""

    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.delta_qkv: LowRankDelta | None = None  # sparse-scale deltas (models/deltas.py), when trained
        self.delta_proj: LowRankDelta | None = None
        self.switch = ScaleSwitch()  # replaced by the model's own, which says where the deltas act

    def qkv(self, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = self.switch.apply(linear_with_bias(self.mat_qkv, x_BLC, bias), x_BLC, self.delta_qkv)
        qkv = qkv.view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, H, L, c
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        return q.to(v.dtype), k.to(v.dtype), v

    def forward(
        self,
        x_BLC: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        query_idx_BK: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every token is a key; with ``query_idx_BK`` only those tokens are queries (B, K, C out)."""
        with component("attention"):
            q, k, v = self.qkv(x_BLC)  # each B, H, L, c
            if cache is not None:
                k, v = cache.append(k, v)
            if query_idx_BK is not None:
                q = q.gather(2, query_idx_BK[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)  # B, H, Lq, c
            out = out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)  # B, Lq, C
            return self.switch.apply(self.proj(out), out, self.delta_proj)


class Modulation(NamedTuple):
    """A block's AdaLN output for one condition: gains, scales and shifts, each (B, 1, C)."""

    gamma1: torch.Tensor
    gamma2: torch.Tensor
    scale1: torch.Tensor
    scale2: torch.Tensor
    shift1: torch.Tensor
    shift2: torch.Tensor


class Block(nn.Module):
    """AdaLN self-attention block (upstream ``AdaLNSelfAttn``).

    ``forward`` is two residual branches, ``attn_branch`` and ``ffn_branch``; the sparse paths
    (``blocks.py``) run the same branches on a subset of tokens, or with another FFN.
    """

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.attn = SelfAttention(C, cfg.num_heads, cfg.attn_l2_norm)
        self.ffn = FFN(C, cfg.ffn_dim, cfg.num_experts, cfg.expert_means)
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.shared_aln = cfg.shared_aln
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.selector = nn.Linear(C, 1) if cfg.num_experts else None

    def modulation(self, cond: torch.Tensor) -> Modulation:
        if self.shared_aln:
            return Modulation(*(self.ada_gss + cond).unbind(2))  # cond: B16C from shared_ada_lin
        return Modulation(*self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2))

    def norm(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """The affine-free LayerNorm, then AdaLN's scale and shift."""
        return self.ln_wo_grad(x).mul(scale.add(1)).add(shift)

    def attn_branch(
        self,
        x: torch.Tensor,
        mod: Modulation,
        attn_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        query_idx_BK: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What attention adds to the residual stream of ``x`` (of the ``query_idx_BK`` tokens only,
        when given: the others are keys, not queries)."""
        return self.attn(self.norm(x, mod.scale1, mod.shift1), attn_mask, cache, query_idx_BK).mul(mod.gamma1)

    def ffn_branch(self, x: torch.Tensor, mod: Modulation, ffn: Callable | None = None) -> torch.Tensor:
        """What the FFN adds to the residual stream of ``x``; ``ffn`` replaces the dense FFN (experts)."""
        return (ffn or self.ffn)(self.norm(x, mod.scale2, mod.shift2)).mul(mod.gamma2)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        mod = self.modulation(cond)
        x = x + self.attn_branch(x, mod, attn_mask, cache)
        return x + self.ffn_branch(x, mod)

    def selector_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Score of each token (B, n): the selector reads the affine-free LayerNorm of the input."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32: choices must not hinge on bf16
            return F.linear(self.ln_wo_grad(x.float()), self.selector.weight.float(), self.selector.bias.float())[
                ..., 0
            ]


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)  # B16C


@dataclass
class TrainOutput:
    logits: torch.Tensor  # B, L, V
    hidden: list[torch.Tensor]  # per block output, B, L, C
    aux: list[sparse.BlockAux]
    cond: torch.Tensor  # what every block is conditioned on (B, C, or B16C with shared AdaLN)
    choice_logits: torch.Tensor | None = None  # the fixed rule's one choice: block 0's selector (B, n)


def derived_buffers(cfg: VARConfig) -> dict[str, torch.Tensor]:
    """Buffers that are functions of the config alone: each token's scale, and the block-causal
    attention bias (0 where a token may attend, -inf elsewhere)."""
    L = cfg.seq_len
    lvl = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.patch_nums)]).view(1, L, 1)
    bias = torch.where(lvl >= lvl.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L)
    return {"lvl_1L": lvl[:, :, 0].contiguous(), "attn_bias_for_masking": bias.contiguous()}


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, L = cfg.embed_dim, cfg.seq_len
        self.first_l = cfg.patch_nums[0] ** 2
        self.begin_ends: list[tuple[int, int]] = []
        cur = 0
        for pn in cfg.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.num_classes = cfg.num_classes

        self.word_embed = nn.Linear(cfg.vae_dim, C)
        init_std = math.sqrt(1 / C / 3)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # the last row is the null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C))
        else:
            self.shared_ada_lin = nn.Identity()
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])

        for name, buf in derived_buffers(cfg).items():
            self.register_buffer(name, buf)

        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.delta_head: LowRankDelta | None = None
        self.switch = ScaleSwitch()
        for b in self.blocks:
            b.attn.switch = self.switch
        if cfg.delta_rank:
            self._make_deltas(cfg.delta_rank)
        self.policy: SparsityPolicy | None = None  # how generation runs it by default (ActVAR models)
        if not self.pos_1LC.is_meta:
            for p in (self.pos_start, self.pos_1LC):
                nn.init.trunc_normal_(p.data, std=init_std)

    @property
    def is_actvar(self) -> bool:
        return self.cfg.num_experts > 0

    def _make_deltas(self, rank: int, seed: int = 0) -> None:
        """Seeded: the same run starts from the same random ``A`` (the global generator's state
        depends on what ran before in the process)."""
        C, g = self.cfg.embed_dim, torch.Generator().manual_seed(seed)
        for b in self.blocks:
            b.attn.delta_qkv, b.attn.delta_proj = LowRankDelta(C, 3 * C, rank, g), LowRankDelta(C, C, rank, g)
        self.delta_head = LowRankDelta(C, self.cfg.vocab_size, rank, g)

    def add_deltas(self, rank: int, seed: int = 0) -> list[nn.Parameter]:
        """Sparse-scale deltas of ``rank`` (stage 2 trains them); zero until trained. Returns them."""
        if self.cfg.delta_rank and rank != self.cfg.delta_rank:
            raise ConfigError(
                f"the model already has rank-{self.cfg.delta_rank} deltas, and rank {rank} was asked for",
                f"train them further with --set delta_rank={self.cfg.delta_rank}, or start from the stage-1 model",
            )
        if not self.cfg.delta_rank:
            self._make_deltas(rank, seed)
            self.to(self.head.weight.device)
            self.cfg = self.cfg.replace(delta_rank=rank)
        return [p for n, p in self.named_parameters() if ".delta_" in n or n.startswith("delta_")]

    @contextlib.contextmanager
    def deltas_at(self, where: str | torch.Tensor | None):
        old, self.switch.where = self.switch.where, (where if self.cfg.delta_rank else None)
        try:
            yield
        finally:
            self.switch.where = old

    # -- shared pieces -----------------------------------------------------------------

    def lvl_pos(self) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC  # 1, L, C

    def logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        with component("head"):
            h = self.head_nm(h.float(), cond_BD).float()
            return self.switch.apply(self.head(h), h, self.delta_head).float()

    def sparse_segments(self, policy: SparsityPolicy | None) -> list[SparseSegment]:
        if policy is None or not self.is_actvar:
            return []
        segs = []
        for si, (bg, ed) in enumerate(self.begin_ends):
            kt = policy.tokens_kept(si, ed - bg)
            kw = policy.experts_kept(si, self.cfg.num_experts)
            if kt < ed - bg or kw < self.cfg.num_experts:
                segs.append(SparseSegment(si, bg, ed, kt, kw, prev_start=self.begin_ends[max(si - 1, 0)][0]))
        return segs

    def delta_scale(self, policy: SparsityPolicy | None) -> int | None:
        """The first scale (0-based) the deltas act at: the first one the policy changes, sparse or
        run without guidance. None: the policy changes nothing, and neither do the deltas."""
        firsts = [seg.scale_index for seg in self.sparse_segments(policy)[:1]]
        if policy is not None and policy.guidance_off:
            firsts.append(len(self.cfg.patch_nums) - policy.guidance_off)
        return min(firsts, default=None)

    # -- teacher forcing ---------------------------------------------------------------

    def embed_teacher_forcing(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> tuple:
        B = label_B.shape[0]
        with torch.autocast(device_type=label_B.device.type, enabled=False):
            sos = cond_BD = self.class_emb(label_B)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        return x_BLC, cond_BD

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Dense teacher-forcing logits (B, L, V); labels equal to num_classes mean 'no class'."""
        return self.forward_train(label_B, x_BLCv_wo_first_l, policy=None).logits

    def forward_train(
        self,
        label_B: torch.Tensor,
        x_BLCv_wo_first_l: torch.Tensor,
        policy: SparsityPolicy | None = None,
        collect_aux: bool = False,
    ) -> TrainOutput:
        """Teacher forcing with the policy applied as masks (dense when policy is None)."""
        if policy is not None and (policy.token_rule == "far-from-mean" or policy.expert_rule == "threshold"):
            raise ConfigError(
                f"the {policy.token_rule}/{policy.expert_rule} rules are training-free", "do not distil them"
            )
        segments = self.sparse_segments(policy)
        first = self.delta_scale(policy)
        where = (self.lvl_1L[0] >= first).float() if first is not None else None  # L: from the first changed scale
        with self.deltas_at(where):
            return self._teacher_forcing(label_B, x_BLCv_wo_first_l, policy, segments, collect_aux)

    def _teacher_forcing(self, label_B, x_BLCv_wo_first_l, policy, segments, collect_aux: bool) -> TrainOutput:
        x, cond_BD = self.embed_teacher_forcing(label_B, x_BLCv_wo_first_l)
        cond = self.shared_ada_lin(cond_BD)
        causal = self.attn_bias_for_masking == 0  # 1, 1, L, L bool
        choices = None
        if segments and policy.token_rule in ("fixed", "centre"):
            choices = sparse.fixed_choices(self, x, segments, policy.token_rule)
        first = next((c for c in choices or [] if c is not None), None)
        hidden, auxes = [], []
        for b in self.blocks:
            if segments:
                aux = sparse.BlockAux(block_input=x) if collect_aux else None
                x = sparse.block_masked(b, x, cond, causal, segments, aux=aux, choices=choices, policy=policy)
                if aux is not None:
                    auxes.append(aux)
            else:
                x = b(x, cond, causal)
            hidden.append(x)
        return TrainOutput(self.logits(x, cond_BD), hidden, auxes, cond, first.logits if first else None)

    # -- generation ----------------------------------------------------------------------

    def new_cache(self, capacity: int | None = None, bits: int = 0) -> list[LayerCache]:
        """One cache per block; ``capacity``: every token the generation will cache (preallocated);
        ``bits``: 8 keeps keys and values as int8 with a scale per token and head (0: as computed)."""
        return [LayerCache(capacity, bits) for _ in self.blocks]

    def generation_step(
        self,
        x_BnC: torch.Tensor,
        cond_BD: torch.Tensor,
        si: int,
        cache: list[LayerCache],
        *,
        policy: SparsityPolicy | None = None,
        state: sparse.GenerationState | None = None,
    ) -> torch.Tensor:
        """Run all blocks on scale ``si``'s tokens (with the KV cache); returns logits (B, n, V)."""
        if not self.cfg.delta_rank:  # no deltas: nothing to switch (the step stays one graph)
            return self._step(x_BnC, cond_BD, si, cache, policy=policy, state=state)
        first = self.delta_scale(policy)
        with self.deltas_at("all" if first is not None and si >= first else None):
            return self._step(x_BnC, cond_BD, si, cache, policy=policy, state=state)

    def _step(self, x_BnC, cond_BD, si: int, cache: list[LayerCache], *, policy, state) -> torch.Tensor:
        cond = self.shared_ada_lin(cond_BD)
        plan = policy.plan(si, self.cfg.patch_nums, self.cfg.num_experts) if policy is not None else None
        dense = plan is None or not (plan.sparse_tokens or plan.sparse_experts(self.cfg.num_experts))
        state = state if state is not None else sparse.GenerationState()
        recording = state.record_sublayers or (plan is not None and plan.record_update)
        x = x_BnC
        for i, (b, layer_cache) in enumerate(zip(self.blocks, cache)):
            if dense and not recording:
                x = b(x, cond, None, layer_cache)
            else:
                x = sparse.block_generate(b, x, cond, layer_cache, plan=plan, state=state, index=i, scale=si)
        return self.logits(x, cond_BD)
