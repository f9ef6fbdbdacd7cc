"""Calibration: what a model's blocks do on token pyramids it generates itself.

``moefy`` fits routers and selectors to these recordings before any training (and the
training-free methods fit their predictors to them): the model generates a few images,
replays them with teacher forcing (conditional and unconditional rows, as CFG runs them)
and every block is recorded at the sparse scales' positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import VAR
from .policy import SparsityPolicy
from .progress import Progress
from .runtime import Runtime
from .sampling import SamplingOptions, generate, image_generators
from .vqvae import VQVAE


@dataclass
class Calibration:
    """Per block, at the sparse scales' positions (subsampled): inputs, FFN inputs, movements."""

    block_in: list[torch.Tensor]  # T, C
    ffn_in: list[torch.Tensor]  # T, C
    movement: list[torch.Tensor]  # T: squared distance between block output and input
    group: torch.Tensor  # T: which (row, sparse scale) each token belongs to; selection ranks within one
    images: int = 0


def sparse_positions(model: VAR, policy: SparsityPolicy) -> torch.Tensor:
    idx = [torch.arange(*model.begin_ends[s - 1]) for s in policy.scales]
    return torch.cat(idx) if idx else torch.arange(0)


@torch.no_grad()
def collect_calibration(
    model: VAR,
    vae: VQVAE,
    policy: SparsityPolicy,
    *,
    images: int,
    batch: int,
    max_tokens: int,
    seed: int,
    runtime: Runtime,
    progress: Progress | None = None,
) -> Calibration:
    """Generate pyramids with the model, replay them with teacher forcing (conditional and
    unconditional rows, as CFG runs them) and record each block at the sparse positions."""
    device = runtime.device
    pos = sparse_positions(model, policy).to(device)
    g = torch.Generator().manual_seed(seed)
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
        while done < images:
            n = min(batch, images - done)
            labels = torch.randint(0, model.num_classes, (n,), generator=g).to(device)
            rng = image_generators(seed, range(done, done + n), device)
            with runtime.autocast():
                gen = generate(model, vae, labels, SamplingOptions(), rng=rng)
                x = vae.quantize.idx_to_var_input(gen.tokens)
                recording[0] = True
                for lab in (labels, torch.full_like(labels, model.num_classes)):
                    model.forward_train(lab, x)
                recording[0] = False
            done += n
            if progress:
                progress("calibration", done, images)
    finally:
        for h in handles:
            h.remove()
    # keep whole rows (so every (row, scale) group stays complete), as many as the token budget allows
    n_rows = sum(t.shape[0] for t in rows_in[0])
    P = pos.numel()
    rows = torch.randperm(n_rows, generator=g)[: max(1, max_tokens // P)].sort().values
    scale_of_pos = torch.cat(
        [torch.full((ed - bg,), i) for i, (bg, ed) in enumerate(model.begin_ends[s - 1] for s in policy.scales)]
    )
    group = (rows[:, None] * len(policy.scales) + scale_of_pos[None, :]).reshape(-1)

    def stack(parts: list[torch.Tensor]) -> torch.Tensor:
        t = torch.cat(parts)[rows]  # rows, P (, C)
        return t.reshape(rows.numel() * P, *t.shape[2:])

    return Calibration(
        block_in=[stack(r) for r in rows_in],
        ffn_in=[stack(r) for r in rows_ffn],
        movement=[stack(r) for r in rows_move],
        group=group,
        images=images,
    )
