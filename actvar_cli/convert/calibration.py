"""Calibration: what a model's blocks do on token pyramids it generates itself.

``moefy`` fits routers and selectors to these recordings before any training (and the
training-free methods fit their predictors to them): the model generates a few images,
replays them with teacher forcing (conditional and unconditional rows, as CFG runs them)
and every block is recorded at the sparse scales' positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..generation.sampling import SamplingOptions, generate, image_generators
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..progress import Progress
from ..runtime import Runtime
from ..sparsity.policy import SparsityPolicy


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


class _Recorder:
    """Forward hooks that keep each block's input, FFN input and movement at ``pos`` while on."""

    def __init__(self, model: VAR, pos: torch.Tensor):
        depth = len(model.blocks)
        self.pos, self.on = pos, False
        self.block_in: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        self.ffn_in: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        self.movement: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        self.handles = [b.register_forward_hook(self._block(i)) for i, b in enumerate(model.blocks)]
        self.handles += [b.ffn.register_forward_hook(self._ffn(i)) for i, b in enumerate(model.blocks)]

    def _block(self, i: int):
        def hook(module, args, output):
            if self.on:
                x_in = args[0][:, self.pos].float()
                self.block_in[i].append(x_in.cpu())
                self.movement[i].append((output[:, self.pos].float() - x_in).square().sum(-1).cpu())

        return hook

    def _ffn(self, i: int):
        def hook(module, args, output):
            if self.on:
                self.ffn_in[i].append(args[0][:, self.pos].float().cpu())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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
    rec = _Recorder(model, sparse_positions(model, policy).to(device))
    g = torch.Generator().manual_seed(seed)
    try:
        for done in range(0, images, batch):
            n = min(batch, images - done)
            labels = torch.randint(0, model.num_classes, (n,), generator=g).to(device)
            rng = image_generators(seed, range(done, done + n), device)
            with runtime.autocast():
                gen = generate(model, vae, labels, SamplingOptions(), rng=rng)  # not recorded
                x = vae.quantize.idx_to_var_input(gen.tokens)
                rec.on = True
                for lab in (labels, torch.full_like(labels, model.num_classes)):
                    model.forward_train(lab, x)
                rec.on = False
            if progress:
                progress("calibration", done + n, images)
    finally:
        rec.remove()
    return _keep_whole_rows(model, policy, rec, max_tokens=max_tokens, g=g, images=images)


def _keep_whole_rows(model: VAR, policy: SparsityPolicy, rec: _Recorder, *, max_tokens: int, g, images: int):
    """As many whole rows as the token budget allows, so that every (row, scale) group stays complete."""
    n_rows = sum(t.shape[0] for t in rec.block_in[0])
    P = rec.pos.numel()
    if P == 0:
        raise ConfigError("the policy has no sparse scales to calibrate", "give the policy at least one scale")
    rows = torch.randperm(n_rows, generator=g)[: max(1, max_tokens // P)].sort().values
    scale_of_pos = torch.cat(
        [torch.full((ed - bg,), i) for i, (bg, ed) in enumerate(model.begin_ends[s - 1] for s in policy.scales)]
    )
    group = (rows[:, None] * len(policy.scales) + scale_of_pos[None, :]).reshape(-1)

    def stack(parts: list[torch.Tensor]) -> torch.Tensor:
        t = torch.cat(parts)[rows]  # rows, P (, C)
        return t.reshape(rows.numel() * P, *t.shape[2:])

    return Calibration(
        block_in=[stack(r) for r in rec.block_in],
        ffn_in=[stack(r) for r in rec.ffn_in],
        movement=[stack(r) for r in rec.movement],
        group=group,
        images=images,
    )
