"""The multi-scale residual VQVAE of VAR (upstream ``VQVAE``), with upstream's state-dict names.

An image is encoded to a 16x-downsampled feature map f; the quantizer explains f as a sum
of K upsampled token maps r_1..r_K (small to large), each followed by a phi conv; VAR
predicts those maps one scale at a time.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VAEConfig


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _group_norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, kernel_size=1)
        self.proj_out = nn.Conv2d(ch, ch, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each B, C, HW
        h = F.scaled_dot_product_attention(
            q.transpose(1, 2).unsqueeze(1), k.transpose(1, 2).unsqueeze(1), v.transpose(1, 2).unsqueeze(1)
        )  # B, 1, HW, C (default scale C**-0.5, as upstream's w_ratio)
        return x + self.proj_out(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class _Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, optional attention, resampler."""


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult, g = cfg.ch, cfg.ch_mult, cfg.norm_groups
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1,) + tuple(mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            level = _Level()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_in = ch * in_mult[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * m, g))
                block_in = ch * m
                if i == len(mult) - 1:
                    level.attn.append(AttnBlock(block_in, g))
            if i != len(mult) - 1:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        self.norm_out = _group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult, g = cfg.ch, cfg.ch_mult, cfg.norm_groups
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        levels = []
        for i in reversed(range(len(mult))):
            level = _Level()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * mult[i], g))
                block_in = ch * mult[i]
                if i == len(mult) - 1:
                    level.attn.append(AttnBlock(block_in, g))
            if i != 0:
                level.upsample = Upsample2x(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) * h + r * conv3x3(h): the residual refinement after each scale."""

    def __init__(self, dim: int, resi_ratio: float):
        super().__init__(dim, dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    """K phi convs shared by all scales: scale si of SN uses the one whose tick is nearest si/(SN-1)."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        K = len(qresi_ls)
        self.ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)

    def __getitem__(self, at_from_0_to_1: float) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at_from_0_to_1)))]


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.vocab_size, self.Cvae = cfg.vocab_size, cfg.z_channels
        self.patch_nums = tuple(cfg.patch_nums)
        self.quant_resi = PhiPartiallyShared(
            nn.ModuleList([Phi(cfg.z_channels, cfg.quant_resi) for _ in range(cfg.share_quant_resi)])
        )
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), cfg.vocab_size))
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    def phi(self, si: int) -> Phi:
        return self.quant_resi[si / (len(self.patch_nums) - 1)]

    def f_to_idx(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale token ids (B, pn*pn) per scale, by greedy residual quantisation."""
        B, C, H, W = f_BChw.shape
        f_rest = f_BChw.detach().clone()
        SN = len(self.patch_nums)
        out = []
        for si, pn in enumerate(self.patch_nums):
            if si != SN - 1:
                z_NC = F.interpolate(f_rest, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, C)
            else:
                z_NC = f_rest.permute(0, 2, 3, 1).reshape(-1, C)
            idx_N = self.nearest(z_NC)
            idx_Bhw = idx_N.view(B, pn, pn)
            h_BChw = self.embedding(idx_Bhw).permute(0, 3, 1, 2)
            if si != SN - 1:
                h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
            f_rest.sub_(self.phi(si)(h_BChw.contiguous()))
            out.append(idx_N.reshape(B, pn * pn))
        return out

    def forward(self, f_BChw: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass (upstream's ``VectorQuantizer2.forward``): quantise scale by scale.

        Returns f_hat with a straight-through gradient to f, the VQ loss (codebook plus
        ``beta`` times commitment, averaged over scales) and the codes used, (SN, B*hw) flat.
        """
        B, C, H, W = f_BChw.shape
        f = f_BChw.float()
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        loss = f.new_zeros(())
        SN = len(self.patch_nums)
        used = []
        for si, pn in enumerate(self.patch_nums):
            last = si == SN - 1
            rest = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            idx_N = self.nearest(rest.permute(0, 2, 3, 1).reshape(-1, C))
            h = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
            h = h if last else F.interpolate(h, size=(H, W), mode="bicubic")
            h = self.phi(si)(h.contiguous())
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + F.mse_loss(f_hat.detach(), f) * beta + F.mse_loss(f_hat, f.detach())
            used.append(idx_N)
        return (f_hat.detach() - f.detach()) + f, loss / SN, torch.cat(used)

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the closest code (squared Euclidean distance) for each row."""
        emb = self.embedding.weight.detach()
        d = torch.sum(z_NC.square(), dim=1, keepdim=True) + emb.square().sum(dim=1)
        d.addmm_(z_NC, emb.T, alpha=-2, beta=1)  # N, V squared distances
        return torch.argmin(d, dim=1)

    def idx_to_var_input(self, idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input (B, L - first_l, Cvae): the accumulated f_hat downsampled to each next scale."""
        B = idx_Bl[0].shape[0]
        C, HW = self.Cvae, self.patch_nums[-1]
        SN = len(self.patch_nums)
        f_hat = idx_Bl[0].new_zeros(B, C, HW, HW, dtype=torch.float32)
        nxt = []
        for si in range(SN - 1):
            pn = self.patch_nums[si]
            h = self.embedding(idx_Bl[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat.add_(self.phi(si)(F.interpolate(h, size=(HW, HW), mode="bicubic")))
            pn_next = self.patch_nums[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, C, -1).transpose(1, 2))
        return torch.cat(nxt, dim=1)

    def next_autoregressive_input(
        self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si``'s map to f_hat (in place); return f_hat and the next scale's input map."""
        HW = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            f_hat.add_(self.phi(si)(F.interpolate(h_BChw, size=(HW, HW), mode="bicubic")))
            pn = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
        f_hat.add_(self.phi(si)(h_BChw))
        return f_hat, f_hat

    def idx_to_fhat(self, idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """The final f_hat (B, Cvae, H, W) of a full token pyramid."""
        B = idx_Bl[0].shape[0]
        HW = self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, HW, HW)
        for si, pn in enumerate(self.patch_nums):
            h = self.embedding(idx_Bl[si]).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, _ = self.next_autoregressive_input(si, f_hat, h)
        return f_hat


class VQVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, stride=1, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode to images in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def img_to_idx(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] to multi-scale token ids."""
        return self.quantize.f_to_idx(self.quant_conv(self.encoder(img_B3HW)))

    def idx_to_img(self, idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_Bl))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # like upstream: a vocabulary-hit table for another number of scales is not an error
        sd = dict(state_dict)
        ema = sd.get("quantize.ema_vocab_hit_SV")
        if ema is not None and ema.shape != self.quantize.ema_vocab_hit_SV.shape:
            sd["quantize.ema_vocab_hit_SV"] = torch.zeros_like(self.quantize.ema_vocab_hit_SV, device="cpu")
        return super().load_state_dict(sd, strict=strict, assign=assign)
