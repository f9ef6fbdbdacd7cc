"""A sampling job: which images to make, in which files; resumable and shardable.

Image ``i`` has class ``classes[i // num_per_class]`` and (by default) randomness seeded
from ``(seed, i)``, so any split of the indices over processes, and any restart that
skips the PNGs already on disk, gives the same set of images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import images
from .config import SparsityPolicy
from .device import autocast, synchronize
from .errors import ConfigError, OutputError
from .model import VAR
from .sampling import SamplingOptions, decode_images, generate, image_generators, to_uint8
from .vqvae import VQVAE

Progress = Callable[[int, int], None]  # (images done, images total)


@dataclass
class SampleJob:
    classes: list[int]
    num_per_class: int = 1
    seed: int = 0
    batch_size: int = 8
    opts: SamplingOptions = field(default_factory=SamplingOptions)
    upstream_seeding: bool = False

    @property
    def total(self) -> int:
        return len(self.classes) * self.num_per_class

    def label(self, index: int) -> int:
        return self.classes[index // self.num_per_class]

    def validate(self, num_classes: int) -> None:
        if not self.classes:
            raise ConfigError("no classes given", "pass --classes 0,7,42")
        bad = [c for c in self.classes if not 0 <= c < num_classes]
        if bad:
            raise ConfigError(f"class id {bad[0]} is out of range", f"this model has classes 0..{num_classes - 1}")
        if self.num_per_class < 1 or self.batch_size < 1:
            raise ConfigError("--num-per-class and --batch-size must be at least 1")

    def batches(self, rank: int = 0, world: int = 1) -> list[tuple[int, list[int]]]:
        """(batch number, indices) for one process. Upstream seeding keeps upstream's fixed
        batches (batch k is seeded with seed + k); otherwise images are dealt round-robin."""
        if self.upstream_seeding:
            starts = range(0, self.total, self.batch_size)
            numbered = [(k, list(range(s, min(s + self.batch_size, self.total)))) for k, s in enumerate(starts)]
            return numbered[rank::world]
        mine = list(range(rank, self.total, world))
        return [(k, mine[s : s + self.batch_size]) for k, s in enumerate(range(0, len(mine), self.batch_size))]


@dataclass
class SampleResult:
    out_dir: Path
    paths: list[Path]
    generated: int
    skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def prepare_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".actvar-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to {out}: {e.strerror}", "choose a writable --out folder") from e
    return out


@torch.no_grad()
def generate_batch(
    model: VAR,
    vae: VQVAE,
    job: SampleJob,
    indices: list[int],
    batch_number: int,
    device: torch.device,
    dtype: str,
    policy: SparsityPolicy | None,
) -> np.ndarray:
    """uint8 NHWC images for ``indices``."""
    labels = torch.tensor([job.label(i) for i in indices], device=device)
    if job.upstream_seeding:
        rng = torch.Generator(device=device).manual_seed(job.seed + batch_number)
    else:
        rng = image_generators(job.seed, indices, device)
    with autocast(device, dtype):
        gen = generate(model, vae, labels, job.opts, rng=rng, policy=policy)
    return to_uint8(decode_images(vae, gen.f_hat))


def run_sample_job(
    model: VAR,
    vae: VQVAE,
    job: SampleJob,
    out_dir: str | Path,
    device: torch.device,
    dtype: str = "fp32",
    policy: SparsityPolicy | None = None,
    progress: Progress | None = None,
    rank: int = 0,
    world: int = 1,
) -> SampleResult:
    """Generate this process's share of the job's images as PNGs, skipping those on disk."""
    job.validate(model.num_classes)
    out = prepare_out_dir(out_dir)
    batches = job.batches(rank, world)
    mine = [i for _, b in batches for i in b]
    path_of = {i: out / images.png_name(i, job.label(i)) for i in mine}
    if job.upstream_seeding:  # a batch's randomness is shared: redo whole batches
        todo = [(k, b) for k, b in batches if not all(path_of[i].exists() for i in b)]
    else:  # any subset can be made: regroup only the missing images
        missing = [i for i in mine if not path_of[i].exists()]
        todo = [(0, missing[s : s + job.batch_size]) for s in range(0, len(missing), job.batch_size)]
    skipped = len(mine) - sum(len(b) for _, b in todo)
    done = skipped
    if progress:
        progress(done, len(mine))
    t0 = time.perf_counter()
    generated = 0
    for batch_number, idx in todo:
        imgs = generate_batch(model, vae, job, idx, batch_number, device, dtype, policy)
        for i, img in zip(idx, imgs):
            images.save_png(path_of[i], img)
        generated += len(idx)
        done += len(idx)
        if progress:
            progress(done, len(mine))
    synchronize(device)
    seconds = time.perf_counter() - t0
    return SampleResult(out, [path_of[i] for i in mine], generated, skipped, seconds)


def finish_outputs(job: SampleJob, out_dir: str | Path, npz: bool, grid: bool = True, grid_max: int = 64) -> tuple:
    """After every process has written its PNGs: the grid and the ADM ``samples.npz`` (rank 0)."""
    out = Path(out_dir)
    paths = [out / images.png_name(i, job.label(i)) for i in range(job.total)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise OutputError(f"{len(missing)} images are missing in {out} (first: {missing[0].name})", "run again")
    grid_path = npz_path = None
    if grid:
        first = np.stack([images.load_png(p) for p in paths[:grid_max]])
        nrow = job.num_per_class if 1 < job.num_per_class <= 16 else min(8, len(first))
        grid_path = out / "grid.png"
        images.save_png(grid_path, images.grid(first, nrow=nrow))
    if npz:
        shape = images.load_png(paths[0]).shape
        npz_path = out / "samples.npz"
        images.write_npz(npz_path, (images.load_png(p) for p in paths), len(paths), shape)
    return grid_path, npz_path
