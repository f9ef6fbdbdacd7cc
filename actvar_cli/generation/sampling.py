"""Autoregressive next-scale generation with classifier-free guidance.

Randomness comes in two modes:

* per image (default): image ``i`` of a run draws from its own generator seeded from
  ``(seed, i)``, so a run split over processes, resumed after a crash, or batched
  differently picks the same tokens for the same image;
* upstream (``--upstream-seeding``): one generator seeded with ``seed`` per batch and a
  single ``torch.multinomial`` over the whole batch per scale, exactly as upstream's
  ``autoregressive_infer_cfg`` (this reproduces its seeded images bit for bit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..components import component
from ..errors import ConfigError
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..sparsity.blocks import GenerationState
from ..sparsity.policy import SparsityPolicy

Rng = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class SamplingOptions:
    """Upstream's FID recipe by default: cfg 1.5, top-k 900, top-p 0.96, no smoothing."""

    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False

    def validate(self) -> None:
        if not (self.cfg >= 0 and self.cfg < float("inf")):
            raise ConfigError(f"--cfg {self.cfg}: must be 0 or more", "upstream samples with 1.5")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k}: must be 0 (off) or more", "upstream samples with 900")
        if not 0 <= self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must be between 0 (off) and 1", "upstream samples with 0.96")


@dataclass
class Generation:
    f_hat: torch.Tensor  # B, Cvae, H, W (float32)
    tokens: list[torch.Tensor]  # per scale, B x pn*pn
    logits: list[torch.Tensor] = field(default_factory=list)  # per scale, rows x n x V (2B while guided; if asked)
    guided: list[torch.Tensor] = field(default_factory=list)  # per scale, B x n x V: what sampling draws from


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, index)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def image_generators(seed: int, indices: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in indices]


def filter_top_k_top_p(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Upstream's masking: keep the top-k logits, then drop the tail whose ascending
    cumulative probability is <= 1 - top_p (always keeping the largest)."""
    logits = logits_BlV.clone()
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    return logits


def sample_tokens(logits_BlV: torch.Tensor, rng: Rng) -> torch.Tensor:
    """One token per position (B, n) from already-filtered logits, as upstream draws them:
    one ``torch.multinomial`` over the flattened batch."""
    B, n, V = logits_BlV.shape
    probs = logits_BlV.softmax(dim=-1)
    return torch.multinomial(probs.view(-1, V), num_samples=1, replacement=True, generator=rng).view(B, n)


def sample_tokens_per_image(
    logits_BlV: torch.Tensor, top_k: int, top_p: float, rng: Sequence[torch.Generator]
) -> torch.Tensor:
    """Per-image sampling with the same top-k / top-p rule, done on the k candidates only.

    After top-k masking only the k best logits have probability, so top-p can be decided
    among them, and row b draws one uniform per position from its own generator and inverts
    the cumulative distribution, taken in vocabulary order.
    """
    B, n, V = logits_BlV.shape
    k = top_k if 0 < top_k < V else V
    vals, idx = logits_BlV.topk(k, dim=-1, largest=True, sorted=True)  # B, n, k, descending
    probs = vals.softmax(-1)
    if top_p > 0:  # drop the tail whose ascending cumulative probability is <= 1 - top_p
        tail = probs.flip(-1).cumsum(-1).flip(-1)  # probability of this candidate and all smaller ones
        drop = tail <= (1 - top_p)
        drop[..., 0] = False  # always keep the largest
        probs = probs.masked_fill(drop, 0.0)
    # the CDF runs in vocabulary order, as upstream's multinomial does: near-equal logits swapping
    # places then cannot move it. Scattering into the vocabulary costs less than sorting the k.
    probs_BlV = torch.zeros_like(logits_BlV, dtype=probs.dtype).scatter_(-1, idx, probs)
    cdf = probs_BlV.cumsum(-1)
    u = torch.stack([torch.rand(n, generator=g, device=logits_BlV.device) for g in rng])  # B, n
    target = (u * cdf[..., -1]).clamp_min(torch.finfo(cdf.dtype).tiny)  # a draw never lands on probability 0
    return torch.searchsorted(cdf, target.unsqueeze(-1)).clamp_max(V - 1).squeeze(-1)


def _multinomial_per_row(logits_BlV: torch.Tensor, rng: Sequence[torch.Generator]) -> torch.Tensor:
    probs = logits_BlV.softmax(dim=-1)
    return torch.stack([torch.multinomial(probs[b], 1, replacement=True, generator=g)[:, 0] for b, g in enumerate(rng)])


def _gumbel_soft(logits: torch.Tensor, tau: float, rng: Rng) -> torch.Tensor:
    """Soft Gumbel-softmax with explicit generators (upstream's ``gumbel_softmax_with_rng``)."""
    if rng is None:
        return F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
    noise = torch.empty_like(logits, memory_format=torch.legacy_contiguous_format)
    if isinstance(rng, torch.Generator):
        noise.exponential_(generator=rng)
    else:
        for b, g in enumerate(rng):
            noise[b].exponential_(generator=g)
    return ((logits - noise.log()) / tau).softmax(-1)


def _pick_tokens(guided_BlV: torch.Tensor, opts: SamplingOptions, rng: Rng, per_image: bool) -> torch.Tensor:
    if per_image and not opts.more_smooth:
        return sample_tokens_per_image(guided_BlV, opts.top_k, opts.top_p, rng)
    filtered = filter_top_k_top_p(guided_BlV, opts.top_k, opts.top_p)
    return sample_tokens(filtered, rng) if not per_image else _multinomial_per_row(filtered, rng)


def _drop_unconditional_rows(cache: list, state: GenerationState, rows: int) -> None:
    """Guidance turns off: from here on only the conditional rows run."""
    for layer in cache:
        layer.keep_rows(rows)
    state.keep_rows(rows)


def guide(cond: torch.Tensor, uncond: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance as upstream applies it: ``(1 + t) c - t u``."""
    return (1 + t) * cond - t * uncond


@torch.no_grad()
def generate(
    model: VAR,
    vae: VQVAE,
    labels_B: torch.Tensor,
    opts: SamplingOptions = SamplingOptions(),
    *,
    rng: Rng = None,
    policy: SparsityPolicy | None = None,
    keep_logits: bool = False,
    forced: list[torch.Tensor] | None = None,
    state: GenerationState | None = None,
) -> Generation:
    """Generate token pyramids for ``labels_B``; CFG rows are [cond; uncond] while guided.

    ``policy`` may skip the last scales and turn guidance off at the last ones; ``forced``
    tokens (per scale, B x n) replace sampling, so that two models can be compared on the
    same pyramid."""
    B = labels_B.shape[0]
    patch_nums = model.cfg.patch_nums
    SN = len(patch_nums)
    if policy is not None:
        policy.check_runnable(model.cfg)
    state = state or GenerationState(record_sublayers=policy is not None and policy.token_rule == "far-from-mean")
    last = policy.generated_scales(SN) if policy is not None else SN
    guided_until = SN - (policy.guidance_off if policy is not None else 0)
    sharpen = policy is not None and policy.guidance_sharpen  # unguided scales: logits times 1 + t (cfg-sharp)
    quant, Cvae, HW = vae.quantize, vae.quantize.Cvae, patch_nums[-1]
    cond_BD = model.class_emb(torch.cat((labels_B, torch.full_like(labels_B, model.num_classes))))
    lvl_pos = model.lvl_pos()
    first = model.first_l
    x = cond_BD.unsqueeze(1).expand(2 * B, first, -1) + model.pos_start.expand(2 * B, first, -1) + lvl_pos[:, :first]
    cache = model.new_cache(cached_tokens(model.cfg.patch_nums, policy), policy.kv_bits if policy else 0)
    f_hat = torch.zeros(B, Cvae, HW, HW, device=labels_B.device, dtype=torch.float32)
    out = Generation(f_hat=f_hat, tokens=[])
    per_image = rng is not None and not isinstance(rng, torch.Generator)  # one generator per image
    cur = 0
    for si in range(last):
        pn, ratio = patch_nums[si], si / (SN - 1)
        cur += pn * pn
        if si == guided_until and x.shape[0] == 2 * B:
            x, cond_BD = x[:B], cond_BD[:B]
            _drop_unconditional_rows(cache, state, B)
        logits = model.generation_step(x, cond_BD, si, cache, policy=policy, state=state)
        t = opts.cfg * ratio
        if logits.shape[0] == 2 * B:
            guided = guide(logits[:B], logits[B:], t).float()
        else:
            guided = logits.float() * (1 + t) if sharpen else logits.float()
        if keep_logits:
            out.logits.append(logits.float())
            out.guided.append(guided)
        idx_Bl = forced[si] if forced is not None else _pick_tokens(guided, opts, rng, per_image)
        out.tokens.append(idx_Bl)
        with torch.autocast(device_type=labels_B.device.type, enabled=False):
            if opts.more_smooth:  # visual smoothing only; never used for FID
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                h_BlC = _gumbel_soft(guided.mul(1 + ratio), tau, rng) @ quant.embedding.weight.unsqueeze(0)
            else:
                h_BlC = quant.embedding(idx_Bl)
            h_BChw = h_BlC.transpose(1, 2).reshape(B, Cvae, pn, pn).float()
            f_hat, next_map = quant.next_autoregressive_input(si, f_hat, h_BChw)
        if si + 1 < last:
            nxt = next_map.view(B, Cvae, -1).transpose(1, 2)  # B, pn_next^2, Cvae
            x = model.word_embed(nxt) + lvl_pos[:, cur : cur + patch_nums[si + 1] ** 2]
            x = x.repeat(2, 1, 1) if x.shape[0] * 2 == cond_BD.shape[0] else x
    out.f_hat = f_hat
    return out


def cached_tokens(patch_nums: tuple[int, ...], policy: SparsityPolicy | None) -> int:
    """How many tokens each block's KV cache holds by the end of a generation under ``policy``."""
    if policy is None:
        return sum(pn * pn for pn in patch_nums)
    last = policy.generated_scales(len(patch_nums))
    if policy.skipped_kv:
        return sum(pn * pn for pn in patch_nums[:last])
    return sum(policy.tokens_kept(si, pn * pn) for si, pn in enumerate(patch_nums[:last]))


def compile_steps(model: VAR) -> VAR:
    """``torch.compile`` each scale's step (a graph per scale and policy: the first batch pays the
    compile time). With the grouped expert kernel a sparse step is one graph with no host sync."""
    import torch._dynamo

    limit = 4 * len(model.cfg.patch_nums)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 4 * limit
    )
    model.generation_step = torch.compile(model.generation_step, dynamic=False)
    return model


DECODE_CHUNK = 16  # images the VQVAE decodes at once: its full-size maps, not the batch, bound the peak


@torch.no_grad()
def decode_images(vae: VQVAE, f_hat: torch.Tensor) -> torch.Tensor:
    """f_hat to images (B, 3, H, W) in [0, 1], in float32, DECODE_CHUNK images at a time (at 256
    pixels one image's decoder maps take about 200 MB: a batch of 256 at once would need 54 GB)."""
    with torch.autocast(device_type=f_hat.device.type, enabled=False), component("decode"):
        parts = [vae.fhat_to_img(f.float()).add_(1).mul_(0.5) for f in f_hat.split(DECODE_CHUNK)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def to_uint8(img_B3HW: torch.Tensor) -> np.ndarray:
    """[0, 1] floats to uint8 NHWC (rounded, as torchvision's save_image does)."""
    return img_B3HW.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
