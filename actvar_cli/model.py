"""The VAR transformer (next-scale prediction), written here with upstream's state-dict names.

One network serves both the dense VAR and ActVAR. An ActVAR model (``cfg.num_experts > 0``)
has two extra linear layers per block: ``ffn.router`` (C -> N experts) and ``selector``
(C -> 1 token score). Its FFN weights are the dense ones with hidden neurons permuted so
that expert ``e`` is the contiguous slice ``fc1.weight[e*d_e:(e+1)*d_e]``; with every expert
and every token active it computes exactly the dense function.

Sparse scales (a ``SparsityPolicy``) run in one of two equivalent ways:

* generation (``Block.forward_sparse``): gather the K_t selected tokens of each row into a
  compact (B, K_t, C) tensor, run attention and the chosen experts on them only, scatter
  back; unselected tokens pass through unchanged (paper eq. 9). Only selected tokens
  enter the block's KV cache.
* teacher forcing (``Block.forward_masked``): the whole sequence at once; the same
  selection is expressed as an attention mask that hides unselected tokens as keys (so
  they are invisible to the block, exactly as in the cache) and as straight-through
  gates whose forward value is the hard 0/1 choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import routing
from .config import SparsityPolicy, VARConfig


class FFN(nn.Module):
    """fc1 -> tanh-GELU -> fc2; with ``num_experts`` it also holds the router."""

    def __init__(self, dim: int, hidden: int, num_experts: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.num_experts = num_experts
        self.router = nn.Linear(dim, num_experts) if num_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerCache:
    """Keys and values one block has seen so far: (B, H, L_cached, head_dim) each."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
        return self.k, self.v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


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

    def qkv(self, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
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
    ) -> torch.Tensor:
        B, L, C = x_BLC.shape
        q, k, v = self.qkv(x_BLC)
        if cache is not None:
            k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


@dataclass
class BlockAux:
    """What a masked (teacher-forcing) block pass exposes for distillation, per sparse scale."""

    selector_logits: list[torch.Tensor] = field(default_factory=list)  # (B, n) per scale
    token_keep: list[torch.Tensor] = field(default_factory=list)  # (B, n) bool
    router_logits: list[torch.Tensor] = field(default_factory=list)  # (B, n, N)
    expert_keep: list[torch.Tensor] = field(default_factory=list)  # (B, n, N) bool
    ffn_input: list[torch.Tensor] = field(default_factory=list)  # (B, n, C), detached
    block_input: torch.Tensor | None = None  # (B, L, C)


class Block(nn.Module):
    """AdaLN self-attention block (upstream ``AdaLNSelfAttn``)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.attn = SelfAttention(C, cfg.num_heads, cfg.attn_l2_norm)
        self.ffn = FFN(C, cfg.ffn_dim, cfg.num_experts)
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.shared_aln = cfg.shared_aln
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.selector = nn.Linear(C, 1) if cfg.num_experts else None

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(gamma1, gamma2, scale1, scale2, shift1, shift2), each (B, 1, C)."""
        if self.shared_aln:
            return (self.ada_gss + cond).unbind(2)  # cond: B16C from shared_ada_lin
        return self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)

    def _norm(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.ln_wo_grad(x).mul(scale.add(1)).add(shift)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        g1, g2, s1, s2, b1, b2 = self.modulation(cond)
        x = x + self.attn(self._norm(x, s1, b1), attn_mask, cache).mul(g1)
        return x + self.ffn(self._norm(x, s2, b2)).mul(g2)

    # -- ActVAR generation path -------------------------------------------------------

    def selector_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Score of each token (B, n): the selector reads the affine-free LayerNorm of the input."""
        return self.selector(self.ln_wo_grad(x)).squeeze(-1)

    def forward_sparse(
        self,
        x_BnC: torch.Tensor,
        cond: torch.Tensor,
        cache: LayerCache,
        keep_tokens: int,
        keep_experts: int,
    ) -> torch.Tensor:
        """One sparse scale during generation: compute only selected tokens and chosen experts."""
        B, n, C = x_BnC.shape
        g1, g2, s1, s2, b1, b2 = self.modulation(cond)
        idx_BK = None
        xs = x_BnC
        if keep_tokens < n:
            idx_BK = routing.select_tokens(self.selector_logits(x_BnC), keep_tokens)
            xs = x_BnC.gather(1, idx_BK.unsqueeze(-1).expand(B, keep_tokens, C))  # B, K_t, C
        xs = xs + self.attn(self._norm(xs, s1, b1), None, cache).mul(g1)
        h = self._norm(xs, s2, b2)
        if keep_experts < self.ffn.num_experts:
            h_TC = h.reshape(-1, C)
            experts_TK = routing.route(self.ffn.router(h_TC), keep_experts)
            ffn_out = routing.experts_forward(self.ffn, h_TC, experts_TK).view_as(h)
        else:
            ffn_out = self.ffn(h)
        xs = xs + ffn_out.mul(g2)
        if idx_BK is None:
            return xs
        return x_BnC.scatter(1, idx_BK.unsqueeze(-1).expand(B, keep_tokens, C), xs)

    # -- ActVAR teacher-forcing path ----------------------------------------------------

    def forward_masked(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        causal_mask: torch.Tensor,
        segments: list[routing.SparseSegment],
        aux: BlockAux | None = None,
    ) -> torch.Tensor:
        """The whole sequence with the generation path's choices expressed as masks.

        ``causal_mask`` (1, 1, L, L) bool is VAR's block-causal mask (True = may attend).
        """
        B, L, C = x.shape
        g1, g2, s1, s2, b1, b2 = self.modulation(cond)
        token_gate = None  # (B, L, 1): 1 for dense tokens, straight-through 0/1 on sparse ones
        key_keep = torch.ones(B, L, dtype=torch.bool, device=x.device)
        for seg in segments:
            if seg.keep_tokens >= seg.length:
                continue
            logits = self.selector_logits(x[:, seg.start : seg.end])  # B, n
            keep = routing.topk_mask(logits, seg.keep_tokens)
            key_keep[:, seg.start : seg.end] = keep
            gate = routing.straight_through(keep, torch.sigmoid(logits))
            if token_gate is None:
                token_gate = x.new_ones(B, L)
            token_gate = torch.cat((token_gate[:, : seg.start], gate, token_gate[:, seg.end :]), dim=1)
            if aux is not None:
                aux.selector_logits.append(logits)
                aux.token_keep.append(keep)
        mask = causal_mask if token_gate is None else causal_mask & key_keep[:, None, None, :]
        y = x + self.attn(self._norm(x, s1, b1), mask).mul(g1)
        h = self._norm(y, s2, b2)
        hidden = self.ffn.act(self.ffn.fc1(h))  # B, L, F
        expert_gate = None  # B, L, N
        for seg in segments:
            if seg.keep_experts >= self.ffn.num_experts:
                continue
            h_seg = h[:, seg.start : seg.end]
            logits = self.ffn.router(h_seg)  # B, n, N
            keep = routing.topk_mask(logits, seg.keep_experts)
            gate = routing.straight_through(keep, logits.softmax(-1))
            if expert_gate is None:
                expert_gate = hidden.new_ones(B, L, self.ffn.num_experts)
            expert_gate = torch.cat((expert_gate[:, : seg.start], gate, expert_gate[:, seg.end :]), dim=1)
            if aux is not None:
                aux.router_logits.append(logits)
                aux.expert_keep.append(keep)
                aux.ffn_input.append(h_seg.detach())
        if expert_gate is not None:
            N = self.ffn.num_experts
            hidden = (hidden.view(B, L, N, -1) * expert_gate.unsqueeze(-1)).view(B, L, -1)  # B,L,N,d_e -> B,L,F
        y = y + self.ffn.fc2(hidden).mul(g2)
        if token_gate is None:
            return y
        return x + token_gate.unsqueeze(-1) * (y - x)


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
    aux: list[BlockAux]
    cond: torch.Tensor  # what every block is conditioned on (B, C, or B16C with shared AdaLN)


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

        lvl = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.patch_nums)]).view(1, L, 1)
        self.register_buffer("lvl_1L", lvl[:, :, 0].contiguous())
        bias = torch.where(lvl >= lvl.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L)
        self.register_buffer("attn_bias_for_masking", bias.contiguous())

        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        if not self.pos_1LC.is_meta:
            for p in (self.pos_start, self.pos_1LC):
                nn.init.trunc_normal_(p.data, std=init_std)

    @property
    def is_actvar(self) -> bool:
        return self.cfg.num_experts > 0

    # -- shared pieces -----------------------------------------------------------------

    def lvl_pos(self) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC  # 1, L, C

    def logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def sparse_segments(self, policy: SparsityPolicy | None) -> list[routing.SparseSegment]:
        if policy is None or not self.is_actvar:
            return []
        segs = []
        for si, (bg, ed) in enumerate(self.begin_ends):
            kt = policy.tokens_kept(si, ed - bg)
            kw = policy.experts_kept(si, self.cfg.num_experts)
            if kt < ed - bg or kw < self.cfg.num_experts:
                segs.append(routing.SparseSegment(si, bg, ed, kt, kw))
        return segs

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
        """Teacher forcing with the ActVAR policy applied as masks (dense when policy is None)."""
        x, cond_BD = self.embed_teacher_forcing(label_B, x_BLCv_wo_first_l)
        cond = self.shared_ada_lin(cond_BD)
        causal = self.attn_bias_for_masking == 0  # 1, 1, L, L bool
        segments = self.sparse_segments(policy)
        hidden, auxes = [], []
        for b in self.blocks:
            if segments:
                aux = BlockAux(block_input=x) if collect_aux else None
                x = b.forward_masked(x, cond, causal, segments, aux)
                if aux is not None:
                    auxes.append(aux)
            else:
                x = b(x, cond, causal)
            hidden.append(x)
        return TrainOutput(self.logits(x, cond_BD), hidden, auxes, cond)

    # -- generation ----------------------------------------------------------------------

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.blocks]

    def generation_step(
        self,
        x_BnC: torch.Tensor,
        cond_BD: torch.Tensor,
        si: int,
        cache: list[LayerCache],
        policy: SparsityPolicy | None = None,
    ) -> torch.Tensor:
        """Run all blocks on scale ``si``'s tokens (with the KV cache); returns logits (B, n, V)."""
        cond = self.shared_ada_lin(cond_BD)
        n = x_BnC.shape[1]
        kt = kw = None
        if policy is not None and self.is_actvar:
            kt = policy.tokens_kept(si, n)
            kw = policy.experts_kept(si, self.cfg.num_experts)
            if kt == n and kw == self.cfg.num_experts:
                kt = kw = None
        x = x_BnC
        for b, layer_cache in zip(self.blocks, cache):
            if kt is None:
                x = b(x, cond, None, layer_cache)
            else:
                x = b.forward_sparse(x, cond, layer_cache, kt, kw)
        return self.logits(x, cond_BD)
