"""A sampling job: which images to make, in which files; resumable and shardable.

Image ``i`` has the label ``labels[i]`` and is always generated in canonical batch
``i // batch_size``, beside the same companions, with randomness seeded from ``(seed, i)``
(or, with upstream seeding, from ``seed + batch``). Float results can depend on a batch's
shape, so a run that is sharded over processes or resumed after a crash regenerates whole
canonical batches and writes only the files that are missing: its images are byte for byte
those of one uninterrupted run. A record in the folder (``samples.json``) says what made its
images; a run that would mix in images of another model, seed or recipe is refused.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, OutputError
from ..files import atomic_write_text
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..progress import Progress
from ..runtime import Runtime
from ..sparsity.policy import SparsityPolicy
from . import images
from .sampling import SamplingOptions, decode_images, generate, image_generators, to_uint8

RECORD = "samples.json"


@dataclass
class SampleJob:
    labels: list[int]  # one per image, in output order
    seed: int = 0
    batch_size: int = 8
    opts: SamplingOptions = field(default_factory=SamplingOptions)
    upstream_seeding: bool = False

    @classmethod
    def blocks(cls, classes: list[int], num_per_class: int, **kw: Any) -> SampleJob:
        """``num_per_class`` images of each class in turn (``sample``'s order)."""
        if num_per_class < 1:
            raise ConfigError(f"--num-per-class {num_per_class}: must be at least 1")
        _check_count(len(classes) * num_per_class)
        return cls([c for c in classes for _ in range(num_per_class)], **kw)

    @classmethod
    def evenly(cls, classes: list[int], num: int, **kw: Any) -> SampleJob:
        """``num`` images cycling through ``classes`` (``eval``'s order: any prefix is balanced)."""
        if num < 1:
            raise ConfigError(f"--num {num}: must be at least 1")
        _check_count(num)
        return cls([classes[i % len(classes)] for i in range(num)] if classes else [], **kw)

    @property
    def total(self) -> int:
        return len(self.labels)

    def label(self, index: int) -> int:
        return self.labels[index]

    def validate(self, num_classes: int) -> None:
        if not self.labels:
            raise ConfigError("no classes given", "pass --classes 0,7,42")
        bad = [c for c in self.labels if not 0 <= c < num_classes]
        if bad:
            raise ConfigError(f"class id {bad[0]} is out of range", f"this model has classes 0..{num_classes - 1}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        self.opts.validate()

    def batches(self, rank: int = 0, world: int = 1) -> list[tuple[int, list[int]]]:
        """(batch number, indices) of the canonical batches this process makes (every world-th)."""
        starts = range(0, self.total, self.batch_size)
        numbered = [(k, list(range(s, min(s + self.batch_size, self.total)))) for k, s in enumerate(starts)]
        return numbered[rank::world]


MAX_IMAGES = 10_000_000  # 200 times the 50,000 of an ImageNet FID run


def _check_count(images: int) -> None:
    """Sizes come from users: refuse a run no disk could hold before anything is allocated."""
    if images > MAX_IMAGES:
        raise ConfigError(f"{images} images are too many for one run", f"ask for at most {MAX_IMAGES}")


def check_disk_space(out_dir: str | Path, images: int, image_bytes: int) -> None:
    """Refuse a sampling run whose PNGs (and their npz) would not fit on the disk of ``out_dir``."""
    folder = Path(out_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    need = 2 * images * image_bytes  # a PNG is at most about the raw size; the npz holds the raw images again
    if need > free:
        raise OutputError(
            f"{images} images need about {need / 2**30:.1f} GiB in {out_dir}, and {free / 2**30:.1f} GiB are free",
            "ask for fewer images or free some space",
        )


@dataclass
class SamplingRun:
    out_dir: Path
    paths: list[Path]
    generated: int
    skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def job_record(job: SampleJob, model_id: str, vae_id: str, policy: SparsityPolicy | None, dtype: str) -> dict[str, Any]:
    """What made a folder's images; a resumed run must match it."""
    return {
        "model": model_id,
        "vae": vae_id,
        "policy": policy.to_dict() if policy is not None else None,
        "seed": job.seed,
        "batch_size": job.batch_size,
        "sampling": job.opts.__dict__,
        "upstream_seeding": job.upstream_seeding,
        "dtype": dtype,
        "labels": job.labels,
    }


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OutputError(f"{path} is unreadable", "choose another --out, or pass --overwrite") from e
    if not isinstance(old, dict) or not isinstance(old.get("labels"), list):
        raise OutputError(f"{path} is not a sampling record", "choose another --out, or pass --overwrite")
    return old


def _check_same_run(out: Path, old: dict[str, Any] | None, record: dict[str, Any], images: list[Path]) -> None:
    if old is None:
        raise OutputError(f"{out} holds images that no record describes", "choose another --out, or --overwrite")
    differ = [k for k in record if k != "labels" and old.get(k) != record[k]]
    n = min(len(old["labels"]), len(record["labels"]))
    if old["labels"][:n] != record["labels"][:n]:
        differ.append("classes")
    if not differ and len(old["labels"]) > len(record["labels"]) and len(images) > len(record["labels"]):
        differ.append("the number of images (the folder holds more)")
    if differ:
        raise OutputError(
            f"{out} holds images of another run (it differs in {', '.join(differ)})",
            "choose another --out, or pass --overwrite to replace them",
        )


def prepare_out_dir(out_dir: str | Path, record: dict[str, Any], overwrite: bool, main: bool = True) -> Path:
    """Check that ``out_dir`` may receive this job's images, and record the job there."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file", "give a folder")
    old_path = out / RECORD
    ours = sorted(out.glob("[0-9]" * 6 + "_class*.png")) if out.is_dir() else []
    old = None if overwrite else _read_record(old_path)
    if (ours or old) and not overwrite:
        _check_same_run(out, old, record, ours)
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            stale = ours if overwrite else _regrouped(ours, old, record)
            for p in [*stale, out / "grid.png", out / "samples.npz"] if stale or overwrite else []:
                p.unlink(missing_ok=True)
            atomic_write_text(old_path, json.dumps(record))
        except OSError as e:
            raise OutputError(f"cannot write to {out}: {e.strerror}", "choose a writable --out folder") from e
    return out


@contextlib.contextmanager
def claimed_folder(out_dir: str | Path, record: dict[str, Any], *, overwrite: bool, main: bool = True):
    """``prepare_out_dir`` for the length of a run: a run that fails before it writes any image
    gives the folder back (its record is removed), so that it never claims a folder for nothing."""
    out = Path(out_dir)
    had_record = (out / RECORD).exists()
    prepare_out_dir(out, record, overwrite, main)
    try:
        yield out
    except BaseException:
        if main and not had_record and not any(out.glob("[0-9]" * 6 + "_class*.png")):
            (out / RECORD).unlink(missing_ok=True)
        raise


def _regrouped(files: list[Path], old: dict[str, Any] | None, new: dict[str, Any]) -> list[Path]:
    """Images of the old run's last canonical batch when the new run fills that batch further:
    made beside other companions, they are made again."""
    if old is None or len(new["labels"]) <= len(old["labels"]):
        return []
    first = len(old["labels"]) // new["batch_size"] * new["batch_size"]  # the start of the old partial batch
    return [p for p in files if int(p.name[:6]) >= first]


@torch.no_grad()
def generate_batch(
    model, vae, job: SampleJob, indices: list[int], *, batch_number: int, runtime: Runtime, policy
) -> np.ndarray:
    """uint8 NHWC images of one canonical batch."""
    device = runtime.device
    labels = torch.tensor([job.label(i) for i in indices], device=device)
    if job.upstream_seeding:
        rng = torch.Generator(device=device).manual_seed(job.seed + batch_number)
    else:
        rng = image_generators(job.seed, indices, device)
    with runtime.autocast():
        gen = generate(model, vae, labels, job.opts, rng=rng, policy=policy)
    return to_uint8(decode_images(vae, gen.f_hat))


def run_sample_job(
    model: VAR,
    vae: VQVAE,
    job: SampleJob,
    out_dir: str | Path,
    *,
    runtime: Runtime,
    policy: SparsityPolicy | None = None,
    progress: Progress | None = None,
    rank: int = 0,
    world: int = 1,
) -> SamplingRun:
    """Make this process's canonical batches that miss a file, writing only the missing files.

    ``out_dir`` must have been prepared (``prepare_out_dir``)."""
    out = Path(out_dir)
    batches = job.batches(rank, world)
    mine = [i for _, b in batches for i in b]
    path_of = {i: out / images.png_name(i, job.label(i)) for i in mine}
    todo = [(k, b) for k, b in batches if not all(path_of[i].exists() for i in b)]
    missing = sum(1 for _, b in todo for i in b if not path_of[i].exists())
    done = len(mine) - missing
    if progress:
        progress("sampling", done, len(mine))
    t0 = time.perf_counter()
    for batch_number, idx in todo:
        imgs = generate_batch(model, vae, job, idx, batch_number=batch_number, runtime=runtime, policy=policy)
        for i, img in zip(idx, imgs):
            if not path_of[i].exists():
                images.save_png(path_of[i], img)
                done += 1
        if progress:
            progress("sampling", done, len(mine))
    runtime.synchronize()
    return SamplingRun(out, [path_of[i] for i in mine], missing, len(mine) - missing, time.perf_counter() - t0)


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
        per_class = _run_length(job.labels)
        nrow = per_class if 1 < per_class <= 16 else min(8, len(first))
        grid_path = out / "grid.png"
        images.save_png(grid_path, images.grid(first, nrow=nrow))
    if npz:
        shape = images.load_png(paths[0]).shape
        npz_path = out / "samples.npz"
        images.write_npz(npz_path, (images.load_png(p) for p in paths), len(paths), shape)
    return grid_path, npz_path


def _run_length(labels: list[int]) -> int:
    """How many images of the first class come in a row (a grid row per class for ``sample``)."""
    n = 1
    while n < len(labels) and labels[n] == labels[0]:
        n += 1
    return n


def generate_images(
    model: VAR,
    vae: VQVAE,
    labels: list[int],
    *,
    seed: int,
    batch_size: int,
    runtime: Runtime,
    policy: SparsityPolicy | None = None,
    opts: SamplingOptions = SamplingOptions(),
) -> np.ndarray:
    """uint8 NHWC images in memory, made in the same canonical batches as a sampling job's files."""
    job = SampleJob(list(labels), seed=seed, batch_size=batch_size, opts=opts)
    out = [
        generate_batch(model, vae, job, idx, batch_number=k, runtime=runtime, policy=policy) for k, idx in job.batches()
    ]
    return np.concatenate(out)


def default_classes(num_classes: int) -> list[int]:
    """Four ImageNet classes (upstream's demo), or the first ten classes of a smaller model."""
    return [980, 437, 22, 562] if num_classes == 1000 else list(range(min(num_classes, 10)))
