"""``moefy``: a dense VAR becomes an ActVAR model (paper sections 3.2-3.3).

Each FFN's hidden neurons are permuted so that expert ``e`` is the contiguous slice
``[e*d_e, (e+1)*d_e)`` of fc1's rows and fc2's columns (a permutation of a sum: the dense
function is unchanged), and every block gets a router ``Linear(C, N)`` and a token
selector ``Linear(C, 1)``.

Before any training the router and selector are fitted, by ridge regression, to the same
targets stage-1 distillation uses: for the router, minus the distance of each expert's
output to the full FFN output; for the selector, how far the block moves each token. The
fit uses token pyramids that the model generates itself (calibration). Without a VAE to
generate with, both fall back to a linearisation of the FFN weights (weight statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .config import SparsityPolicy, VARConfig
from .device import autocast
from .errors import ConfigError
from .model import VAR
from .sampling import SamplingOptions, generate, image_generators
from .vqvae import VQVAE

SPLITS = ("cluster", "contiguous", "coactivation")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class MoefyOptions:
    num_experts: int = 16
    split: str = "cluster"
    policy: SparsityPolicy = field(default_factory=SparsityPolicy)
    calib_images: int = 8  # token pyramids the model generates for calibration (0: weight statistics)
    calib_batch: int = 8
    calib_max_tokens: int = 4096  # tokens per block kept for the fits
    kmeans_iters: int = 25
    ridge: float = 1e-3  # relative ridge strength (times the mean diagonal of X^T X)
    seed: int = 0


@dataclass
class Calibration:
    """Per block, at the sparse scales' positions (subsampled): inputs, FFN inputs, movements."""

    block_in: list[torch.Tensor]  # T, C
    ffn_in: list[torch.Tensor]  # T, C
    movement: list[torch.Tensor]  # T: squared distance between block output and input
    group: torch.Tensor  # T: which (row, sparse scale) each token belongs to; selection ranks within one
    images: int = 0


@dataclass
class MoefyReport:
    router_init: str  # "calibration" or "weight-statistics"
    router_r2: list[float] = field(default_factory=list)  # per block
    selector_r2: list[float] = field(default_factory=list)
    router_topk_agreement: list[float] = field(default_factory=list)  # fitted vs target top-K_w overlap
    calib_images: int = 0
    calib_tokens: int = 0


def check_options(cfg: VARConfig, opts: MoefyOptions) -> None:
    if cfg.num_experts:
        raise ConfigError("this model is already an ActVAR model", "give the dense VAR checkpoint to moefy")
    if opts.num_experts < 2:
        raise ConfigError(f"--experts {opts.num_experts}: need at least 2 experts")
    if cfg.ffn_dim % opts.num_experts:
        divisors = [n for n in (2, 4, 8, 16, 32, 64) if cfg.ffn_dim % n == 0]
        raise ConfigError(
            f"{opts.num_experts} experts do not divide the FFN width {cfg.ffn_dim}",
            f"use a divisor such as {', '.join(map(str, divisors))}",
        )
    if opts.split not in SPLITS:
        raise ConfigError(f"unknown split {opts.split!r}", f"use one of {', '.join(SPLITS)}")
    if opts.calib_images < 0:
        raise ConfigError("--calib-images must be 0 or more")
    opts.policy.validate_for(cfg)


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


def sparse_positions(model: VAR, policy: SparsityPolicy) -> torch.Tensor:
    idx = [torch.arange(*model.begin_ends[s - 1]) for s in policy.scales]
    return torch.cat(idx) if idx else torch.arange(0)


@torch.no_grad()
def collect_calibration(
    model: VAR,
    vae: VQVAE,
    opts: MoefyOptions,
    device: torch.device,
    dtype: str = "fp32",
    progress: Progress | None = None,
) -> Calibration:
    """Generate pyramids with the model, replay them with teacher forcing (conditional and
    unconditional rows, as CFG runs them) and record each block at the sparse positions."""
    pos = sparse_positions(model, opts.policy).to(device)
    g = torch.Generator().manual_seed(opts.seed)
    depth = len(model.blocks)
    rows_in: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    rows_ffn: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    rows_move: list[list[torch.Tensor]] = [[] for _ in range(depth)]

    recording = [False]  # the hooks record only the teacher-forcing replay, not generation

    def block_hook(i):
        def hook(module, args, output):
            if not recording[0]:
                return
            x_in = args[0][:, pos].float()
            rows_in[i].append(x_in.cpu())
            rows_move[i].append((output[:, pos].float() - x_in).square().sum(-1).cpu())

        return hook

    def ffn_hook(i):
        def hook(module, args, output):
            if recording[0]:
                rows_ffn[i].append(args[0][:, pos].float().cpu())

        return hook

    handles = [b.register_forward_hook(block_hook(i)) for i, b in enumerate(model.blocks)]
    handles += [b.ffn.register_forward_hook(ffn_hook(i)) for i, b in enumerate(model.blocks)]
    try:
        done = 0
        while done < opts.calib_images:
            n = min(opts.calib_batch, opts.calib_images - done)
            labels = torch.randint(0, model.num_classes, (n,), generator=g).to(device)
            rng = image_generators(opts.seed, range(done, done + n), device)
            with autocast(device, dtype):
                gen = generate(model, vae, labels, SamplingOptions(), rng=rng)
                x = vae.quantize.idx_to_var_input(gen.tokens)
                recording[0] = True
                for lab in (labels, torch.full_like(labels, model.num_classes)):
                    model.forward_train(lab, x)
                recording[0] = False
            done += n
            if progress:
                progress("calibration", done, opts.calib_images)
    finally:
        for h in handles:
            h.remove()
    # keep whole rows (so every (row, scale) group stays complete), as many as the token budget allows
    n_rows = sum(t.shape[0] for t in rows_in[0])
    P = pos.numel()
    rows = torch.randperm(n_rows, generator=g)[: max(1, opts.calib_max_tokens // P)].sort().values
    scale_of_pos = torch.cat([torch.full((ed - bg,), i) for i, (bg, ed) in enumerate(
        model.begin_ends[s - 1] for s in opts.policy.scales)])  # fmt: skip
    group = (rows[:, None] * len(opts.policy.scales) + scale_of_pos[None, :]).reshape(-1)

    def stack(parts: list[torch.Tensor]) -> torch.Tensor:
        t = torch.cat(parts)[rows]  # rows, P (, C)
        return t.reshape(rows.numel() * P, *t.shape[2:])

    return Calibration(
        block_in=[stack(r) for r in rows_in],
        ffn_in=[stack(r) for r in rows_ffn],
        movement=[stack(r) for r in rows_move],
        group=group,
        images=opts.calib_images,
    )


# ---------------------------------------------------------------------------
# Splitting neurons into experts
# ---------------------------------------------------------------------------


def balanced_assign(sim: np.ndarray, capacity: int) -> np.ndarray:
    """Each row to a column, at most ``capacity`` rows per column; rows with the clearest
    preference choose first, each taking its best column that still has room."""
    n_rows, n_cols = sim.shape
    prefs = np.argsort(-sim, axis=1)
    top2 = np.take_along_axis(sim, prefs[:, :2], axis=1) if n_cols > 1 else np.zeros((n_rows, 2))
    order = np.argsort(-(top2[:, 0] - top2[:, 1]), kind="stable")
    counts = np.zeros(n_cols, dtype=np.int64)
    labels = np.empty(n_rows, dtype=np.int64)
    for r in order:
        for c in prefs[r]:
            if counts[c] < capacity:
                labels[r] = c
                counts[c] += 1
                break
    return labels


def balanced_kmeans(points: torch.Tensor, k: int, iters: int, seed: int) -> np.ndarray:
    """Spherical k-means with equal cluster sizes (as MoEfication splits FFNs)."""
    x = F.normalize(points.float(), dim=1).numpy()
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(n, size=k, replace=False)]
    labels = np.full(n, -1)
    for _ in range(iters):
        new = balanced_assign(x @ centroids.T, n // k)
        if np.array_equal(new, labels):
            break
        labels = new
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return labels


def expert_permutation(labels: np.ndarray) -> torch.Tensor:
    """Neuron order that puts expert 0's neurons first, then expert 1's, ..."""
    return torch.from_numpy(np.argsort(labels, kind="stable"))


def split_block(block, opts: MoefyOptions, ffn_in: torch.Tensor | None, seed: int) -> torch.Tensor:
    """The neuron permutation of one block's FFN."""
    F_dim = block.ffn.fc1.weight.shape[0]
    if opts.split == "contiguous":
        return torch.arange(F_dim)
    w1 = block.ffn.fc1.weight.detach().float().cpu()
    if opts.split == "cluster":
        return expert_permutation(balanced_kmeans(w1, opts.num_experts, opts.kmeans_iters, seed))
    if ffn_in is None:
        raise ConfigError("--split coactivation needs calibration tokens", "pass --vae and --calib-images > 0")
    act = F.gelu(F.linear(ffn_in, w1, block.ffn.fc1.bias.detach().float().cpu()), approximate="tanh")
    firing = (act > 0).float().T  # F, T: which tokens each neuron fires on
    firing = firing - firing.mean(dim=1, keepdim=True)  # co-activation beyond each neuron's base rate
    return expert_permutation(balanced_kmeans(firing, opts.num_experts, opts.kmeans_iters, seed))


def permute_ffn(block, perm: torch.Tensor) -> None:
    ffn = block.ffn
    ffn.fc1.weight.data = ffn.fc1.weight.data[perm].contiguous()
    ffn.fc1.bias.data = ffn.fc1.bias.data[perm].contiguous()
    ffn.fc2.weight.data = ffn.fc2.weight.data[:, perm].contiguous()


# ---------------------------------------------------------------------------
# Router and selector initialisation
# ---------------------------------------------------------------------------


def expert_distances(ffn, h_TC: torch.Tensor, num_experts: int, chunk: int = 1024) -> torch.Tensor:
    """d[t, e] = mean squared distance between expert e's output (with fc2's bias) and the FFN output."""
    w1, b1 = ffn.fc1.weight.float(), ffn.fc1.bias.float()
    w2 = ffn.fc2.weight.float().view(w1.shape[1], num_experts, -1)  # C, N, d_e
    out = []
    for s in range(0, h_TC.shape[0], chunk):
        h = h_TC[s : s + chunk].to(w1.device)
        act = F.gelu(F.linear(h, w1, b1), approximate="tanh").view(h.shape[0], num_experts, -1)  # T, N, d_e
        experts = torch.einsum("tnd,cnd->tnc", act, w2)  # T, N, C (without the shared bias)
        full = experts.sum(1, keepdim=True)
        out.append((experts - full).square().mean(-1).cpu())
    return torch.cat(out)


def ridge_fit(x_TC: torch.Tensor, y_TK: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Least squares with an intercept and a relative ridge: (weight K x C, bias K, R^2)."""
    x = x_TC.double()
    y = y_TK.double()
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    gram = xc.T @ xc
    lam = strength * gram.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)  # C, K
    pred = xc @ w
    r2 = 1 - (yc - pred).square().sum() / yc.square().sum().clamp_min(1e-12)
    b = ym - xm @ w
    return w.T.float(), b.float(), float(r2)


def center_by_group(t: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Subtract each group's mean (rows of ``t`` grouped by ``group``)."""
    _, inv = group.unique(return_inverse=True)
    n = int(inv.max()) + 1
    sums = torch.zeros(n, *t.shape[1:], dtype=t.dtype).index_add_(0, inv, t)
    counts = torch.bincount(inv, minlength=n).to(t.dtype).view(n, *([1] * (t.dim() - 1)))
    return t - (sums / counts)[inv]


def standardize(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (t - t.mean()) / t.std().clamp_min(1e-12)
    return (t - t.mean(dim, keepdim=True)) / t.std(dim, keepdim=True).clamp_min(1e-12)


def init_from_calibration(model: VAR, calib: Calibration, opts: MoefyOptions, report: MoefyReport) -> None:
    N = opts.num_experts
    kw = max(1, round(opts.policy.weight_rates[0] * N)) if opts.policy.weight_rates else N
    for i, block in enumerate(model.blocks):
        # router: logits that rank experts as the stage-1 pseudo-labels do (closest to the FFN first)
        target = standardize(-expert_distances(block.ffn, calib.ffn_in[i], N), dim=1)
        w, b, r2 = ridge_fit(calib.ffn_in[i], target, opts.ridge)
        block.ffn.router.weight.data.copy_(w)
        block.ffn.router.bias.data.copy_(b)
        report.router_r2.append(r2)
        fitted = F.linear(calib.ffn_in[i], w, b)
        overlap = torch.zeros_like(target, dtype=torch.bool).scatter_(
            1, fitted.topk(kw, 1).indices, True
        ) & torch.zeros_like(target, dtype=torch.bool).scatter_(1, target.topk(kw, 1).indices, True)
        report.router_topk_agreement.append(float(overlap.sum(1).float().mean() / kw))
        # selector: a score that ranks the tokens of one (row, scale) by how far the block moves them.
        # Only the ranking within a group matters, so the fit uses within-group deviations
        # (what differs between samples, such as their AdaLN gains, is not the selector's job).
        x = F.layer_norm(calib.block_in[i], (calib.block_in[i].shape[1],), eps=model.cfg.norm_eps).double()
        y = torch.log(calib.movement[i].double() + 1e-12)
        xc, yc = center_by_group(x, calib.group), center_by_group(y, calib.group)
        w, _, r2 = ridge_fit(xc, (yc / yc.std().clamp_min(1e-12)).unsqueeze(1), opts.ridge)
        block.selector.weight.data.copy_(w)
        block.selector.bias.data.zero_()  # a constant does not change a ranking
        report.selector_r2.append(r2)


def init_from_weights(model: VAR, opts: MoefyOptions) -> None:
    """No calibration data: linearise each expert's output size.

    Expert e's contribution grows with sum_i |w2_i| * gelu(w1_i . h + b1_i); near zero gelu(z)
    ~ z/2, so the router row is sum_i |w2_i| w1_i / 2 over e's neurons (and likewise the
    bias). The selector sums the rows: tokens that excite the FFN most move most.
    """
    N = opts.num_experts
    for block in model.blocks:
        ffn = block.ffn
        scale = ffn.fc2.weight.float().norm(dim=0)  # F: output size of each neuron
        w = (ffn.fc1.weight.float() * scale[:, None]).view(N, -1, ffn.fc1.weight.shape[1]).sum(1) / 2
        b = (ffn.fc1.bias.float() * scale).view(N, -1).sum(1) / 2
        norm = w.norm(dim=1).mean().clamp_min(1e-12)
        ffn.router.weight.data.copy_(w / norm)
        ffn.router.bias.data.copy_(b / norm)
        block.selector.weight.data.copy_(w.sum(0, keepdim=True) / (norm * math.sqrt(N)))
        block.selector.bias.data.zero_()


# ---------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------


def moefy(
    dense: VAR,
    vae: VQVAE | None,
    opts: MoefyOptions,
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
    progress: Progress | None = None,
) -> tuple[VAR, MoefyReport]:
    """An ActVAR model made from ``dense``, with ``opts.num_experts`` experts per FFN.

    The result shares the unchanged tensors with ``dense`` (no copy of a multi-GB model);
    load the dense model again if both are needed afterwards.
    """
    check_options(dense.cfg, opts)
    device = torch.device(device)
    calib = None
    if opts.calib_images > 0 and vae is not None:
        calib = collect_calibration(dense.to(device), vae.to(device), opts, device, dtype, progress)
    elif opts.split == "coactivation":
        raise ConfigError("--split coactivation needs calibration tokens", "pass --vae and --calib-images > 0")

    cfg = dense.cfg.replace(num_experts=opts.num_experts)
    C, N = cfg.embed_dim, opts.num_experts
    sd = dict(dense.state_dict())
    for i in range(cfg.depth):  # filled below
        sd[f"blocks.{i}.ffn.router.weight"] = torch.zeros(N, C, device=device)
        sd[f"blocks.{i}.ffn.router.bias"] = torch.zeros(N, device=device)
        sd[f"blocks.{i}.selector.weight"] = torch.zeros(1, C, device=device)
        sd[f"blocks.{i}.selector.bias"] = torch.zeros(1, device=device)
    with torch.device("meta"):
        model = VAR(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.to(device).float().eval().requires_grad_(False)
    model.policy = opts.policy

    for i, block in enumerate(model.blocks):
        perm = split_block(block, opts, calib.ffn_in[i] if calib else None, opts.seed + i)
        permute_ffn(block, perm.to(block.ffn.fc1.weight.device))
        if progress:
            progress("split", i + 1, len(model.blocks))
    report = MoefyReport(router_init="calibration" if calib else "weight-statistics")
    if calib is not None:
        model.to("cpu")  # the fits run on the CPU in float64
        init_from_calibration(model, calib, opts, report)
        model.to(device)
        report.calib_images = calib.images
        report.calib_tokens = int(calib.block_in[0].shape[0])
    else:
        init_from_weights(model, opts)
    return model, report
