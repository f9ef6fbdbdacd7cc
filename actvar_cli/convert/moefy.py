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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.config import VARConfig, check_expert_count
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..progress import Progress
from ..runtime import CPU, Runtime
from ..sparsity.experts import (
    chosen_from_pairs,
    chosen_from_topk,
    dropped_means,
    expert_distances,
    expert_norms,
    route,
    threshold_pairs,
)
from ..sparsity.policy import SparsityPolicy
from .calibration import Calibration, collect_calibration

SPLITS = ("cluster", "contiguous", "coactivation")


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
    router_fit: str = "pseudo-labels"  # pseudo-labels (ActVAR) | norms (D2DMoE) | static (Table 5)
    router_target: str = "distance"  # ActVAR's pseudo-labels: experts closest to the FFN, or largest (norm)
    expert_means: bool = False  # add each dropped expert's mean output (fitted on calibration tokens)


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
    check_expert_count(cfg.ffn_dim, opts.num_experts)
    if opts.router_fit not in ROUTER_FITS:
        raise ConfigError(f"unknown router fit {opts.router_fit!r}", f"use one of {', '.join(ROUTER_FITS)}")
    if opts.router_fit != "pseudo-labels" and opts.calib_images == 0:
        raise ConfigError(f"the {opts.router_fit} router is fitted on calibration tokens", "give --calib-images > 0")
    if opts.split not in SPLITS:
        raise ConfigError(f"unknown split {opts.split!r}", f"use one of {', '.join(SPLITS)}")
    if opts.calib_images < 0:
        raise ConfigError("--calib-images must be 0 or more")
    opts.policy.validate_for(cfg)


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


ROUTER_FITS = ("pseudo-labels", "norms", "static")


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


def fit_other_router(block, ffn_in: torch.Tensor, opts: MoefyOptions, report: MoefyReport) -> None:
    """D2DMoE's router predicts each expert's output norm (ridge fit); a static router has zero
    weights and each expert's mean norm as bias, so every token picks the same experts."""
    norms = expert_norms(block.ffn, ffn_in, opts.num_experts)  # T, N
    if opts.router_fit == "norms":
        w, b, r2 = ridge_fit(ffn_in, norms, opts.ridge)
        report.router_r2.append(r2)
    else:
        w, b = torch.zeros_like(block.ffn.router.weight), norms.mean(0)
    block.ffn.router.weight.data.copy_(w)
    block.ffn.router.bias.data.copy_(b)


def init_from_calibration(model: VAR, calib: Calibration, opts: MoefyOptions, report: MoefyReport) -> None:
    N = opts.num_experts
    kw = max(1, round(opts.policy.weight_rates[0] * N)) if opts.policy.weight_rates else N
    for i, block in enumerate(model.blocks):
        _fit_selector(block, calib, i, eps=model.cfg.norm_eps, opts=opts, report=report)
        if opts.router_fit != "pseudo-labels":
            fit_other_router(block, calib.ffn_in[i], opts, report)
            continue
        # router: logits that rank experts as the stage-1 pseudo-labels do
        if opts.router_target == "norm":
            target = standardize(expert_norms(block.ffn, calib.ffn_in[i], N), dim=1)
        else:
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


def fit_expert_means(model: VAR, calib: Calibration, policy: SparsityPolicy) -> None:
    """Each FFN's ``dropped_mean``: its experts' mean outputs over the calibration tokens whose
    fitted router drops them, under the policy's expert rule at each token's scale."""
    scale_T = calib.group % max(1, len(policy.scales))  # index into policy.scales
    for i, block in enumerate(model.blocks):
        ffn, h = block.ffn, calib.ffn_in[i]
        logits = ffn.router_logits(h)  # T, N
        chosen = torch.zeros_like(logits)
        for k, scale in enumerate(policy.scales):  # the rule generation applies (sparsity/blocks.py)
            rows, N, tau = scale_T == k, ffn.num_experts, policy.threshold(scale - 1)
            if tau is not None:
                chosen[rows] = chosen_from_pairs(threshold_pairs(logits[rows], tau), int(rows.sum()), N)
            else:
                chosen[rows] = chosen_from_topk(route(logits[rows], policy.experts_kept(scale - 1, N)), N)
        ffn.dropped_mean.data.copy_(dropped_means(ffn, h, chosen))


def _fit_selector(block, calib: Calibration, i: int, *, eps: float, opts: MoefyOptions, report: MoefyReport) -> None:
    """A score that ranks the tokens of one (row, scale) by how far the block moves them.

    Only the ranking within a group matters, so the fit uses within-group deviations (what
    differs between samples, such as their AdaLN gains, is not the selector's job)."""
    x = F.layer_norm(calib.block_in[i], (calib.block_in[i].shape[1],), eps=eps).double()
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
    *,
    runtime: Runtime = CPU,
    progress: Progress | None = None,
) -> tuple[VAR, MoefyReport]:
    """An ActVAR model made from ``dense``, with ``opts.num_experts`` experts per FFN.

    The result shares the unchanged tensors with ``dense`` (no copy of a multi-GB model);
    load the dense model again if both are needed afterwards.
    """
    check_options(dense.cfg, opts)
    device = runtime.device
    calib = None
    if opts.calib_images > 0 and vae is not None:
        calib = collect_calibration(
            dense.to(device),
            vae.to(device),
            opts.policy,
            images=opts.calib_images,
            batch=opts.calib_batch,
            max_tokens=opts.calib_max_tokens,
            seed=opts.seed,
            runtime=runtime,
            progress=progress,
        )
    elif opts.split == "coactivation" or opts.router_fit != "pseudo-labels":
        what = "--split coactivation" if opts.split == "coactivation" else f"the {opts.router_fit} router"
        raise ConfigError(f"{what} needs calibration tokens", "pass --vae and --calib-images > 0")

    cfg = dense.cfg.replace(num_experts=opts.num_experts, expert_means=opts.expert_means and calib is not None)
    C, N = cfg.embed_dim, opts.num_experts
    sd = dict(dense.state_dict())
    for i in range(cfg.depth):  # filled below
        sd[f"blocks.{i}.ffn.router.weight"] = torch.zeros(N, C, device=device)
        sd[f"blocks.{i}.ffn.router.bias"] = torch.zeros(N, device=device)
        if cfg.expert_means:
            sd[f"blocks.{i}.ffn.dropped_mean"] = torch.zeros(N, C, device=device)
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
        if cfg.expert_means:
            fit_expert_means(model, calib, opts.policy)
        model.to(device)
        report.calib_images = calib.images
        report.calib_tokens = int(calib.block_in[0].shape[0])
    else:
        init_from_weights(model, opts)
    return model, report
