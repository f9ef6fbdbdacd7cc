"""Where training token pyramids come from: the teacher itself, an ImageFolder, or a token cache.

Every source answers ``batch(items)`` for (epoch, sample id) pairs; a sample is the same
whatever the number of processes or however often the run was resumed, because its
class, crop and sampling randomness depend only on ``(seed, k)``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..files import atomic_write_text, atomic_write_with
from ..generation.images import IMAGE_SUFFIXES
from ..generation.sampling import SamplingOptions, generate, image_seed
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..progress import Progress
from ..reference import shapes

CACHE_FORMAT = "actvar-token-cache"


@dataclass
class TokenBatch:
    labels: torch.Tensor  # B
    tokens: list[torch.Tensor]  # per scale, B x pn*pn

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(self.labels.to(device), [t.to(device) for t in self.tokens])


class TokenSource(Protocol):
    description: str
    shuffle: bool  # whether epochs visit samples in a seeded random order (fixed data) or not (fresh data)

    def __len__(self) -> int: ...  # samples per epoch

    def batch(self, items: list[tuple[int, int]]) -> TokenBatch: ...  # (epoch, sample id) pairs


def split_levels(flat_BL: torch.Tensor, patch_nums: tuple[int, ...]) -> list[torch.Tensor]:
    out, cur = [], 0
    for pn in patch_nums:
        out.append(flat_BL[:, cur : cur + pn * pn])
        cur += pn * pn
    return out


class TeacherSource:
    """Data-free: the dense teacher samples pyramids for random classes with CFG."""

    def __init__(self, teacher: VAR, vae: VQVAE, *, samples_per_epoch: int, opts: SamplingOptions, seed: int, device):
        self.teacher, self.vae, self.n, self.opts, self.seed = teacher, vae, samples_per_epoch, opts, seed
        self.device = torch.device(device)
        self.description = f"teacher (data-free, {samples_per_epoch} samples per epoch)"
        self.shuffle = False  # every sample is a fresh pyramid: order is already random

    def __len__(self) -> int:
        return self.n

    def label_of(self, k: int) -> int:
        return image_seed(self.seed + 7919, k) % self.teacher.num_classes

    @torch.no_grad()
    def batch(self, items: list[tuple[int, int]]) -> TokenBatch:
        global_ids = [epoch * self.n + k for epoch, k in items]  # a new pyramid for every sample of every epoch
        labels = torch.tensor([self.label_of(k) for k in global_ids], device=self.device)
        rng = [torch.Generator(device=self.device).manual_seed(image_seed(self.seed, k)) for k in global_ids]
        gen = generate(self.teacher, self.vae, labels, self.opts, rng=rng)
        return TokenBatch(labels, gen.tokens)


class ShapesSource:
    """The shapes train stream (the reference model's ImageNet), encoded by the VQVAE as it is read.

    Every sample of every epoch is a fresh image; the stream's indices start far past those
    the reference model itself was trained on."""

    FIRST = 100_000_000

    def __init__(self, vae: VQVAE, samples_per_epoch: int, seed: int, device):
        self.vae, self.n, self.seed = vae, samples_per_epoch, seed
        self.device = torch.device(device)
        self.description = f"shapes (fresh images, {samples_per_epoch} per epoch)"
        self.shuffle = False

    def __len__(self) -> int:
        return self.n

    @torch.no_grad()
    def batch(self, items: list[tuple[int, int]]) -> TokenBatch:

        ids = [self.FIRST + self.seed * 1_000_003 + epoch * self.n + k for epoch, k in items]
        imgs, labels = shapes.images("train", ids)
        tokens = self.vae.img_to_idx(shapes.to_model_input(imgs).to(self.device))
        return TokenBatch(torch.from_numpy(labels).to(self.device), tokens)


class TokenCacheSource:
    """A folder written by ``encode_image_folder``: tokens.npy (N, L) and labels.npy (N,).

    Every array is checked when the cache is opened, before training: shapes against the model's
    layout, integer types, and every token and label in range."""

    def __init__(self, folder: str | Path, patch_nums: tuple[int, ...], *, vae_id: str, vocab_size: int, classes: int):
        folder = Path(folder)
        meta = read_cache_meta(folder)
        if list(meta.get("patch_nums", [])) != list(patch_nums):
            raise DataError(
                f"token cache {folder} has patch layout {meta.get('patch_nums')}, the model {list(patch_nums)}"
            )
        if meta.get("vae_sha256") != vae_id:
            raise DataError(
                f"token cache {folder} was encoded with another VQVAE ({str(meta.get('vae_sha256'))[:19]}…)",
                "encode the images again with this model's VAE (--cache-tokens into a new folder)",
            )
        self.tokens = _load_int_array(folder / "tokens.npy", ndim=2)
        self.labels = _load_int_array(folder / "labels.npy", ndim=1)
        L = sum(p * p for p in patch_nums)
        n = len(self.labels)
        if n == 0 or self.tokens.shape != (n, L):
            raise DataError(
                f"token cache {folder}: tokens {self.tokens.shape} and labels ({n},) do not match ({n}, {L})"
            )
        _check_range(folder / "tokens.npy", self.tokens, vocab_size)
        _check_range(folder / "labels.npy", self.labels, classes)
        self.patch_nums = tuple(patch_nums)
        self.description = f"token cache {folder} ({n} images from {meta.get('source', '?')})"
        self.shuffle = True

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, items: list[tuple[int, int]]) -> TokenBatch:
        idx = np.asarray([k for _, k in items])
        flat = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return TokenBatch(torch.from_numpy(self.labels[idx].astype(np.int64)), split_levels(flat, self.patch_nums))


def _load_int_array(path: Path, ndim: int) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable .npy array", "encode the images again") from e
    if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path} holds {arr.dtype} values of shape {arr.shape}, not {ndim}-D integers")
    return arr


def _check_range(path: Path, arr: np.ndarray, high: int, chunk: int = 1 << 16) -> None:
    """Every value in [0, high): one streaming pass, chunk by chunk."""
    for s in range(0, len(arr), chunk):
        part = arr[s : s + chunk]
        if part.size and (part.min() < 0 or part.max() >= high):
            raise DataError(f"{path} holds values outside 0..{high - 1}", "encode the images again with this model")


def read_cache_meta(folder: Path) -> dict:
    meta_path = folder / "meta.json"
    if not meta_path.exists() or not (folder / "tokens.npy").exists():
        raise DataError(f"{folder} is not a token cache (no meta.json / tokens.npy)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path} is unreadable") from e
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise DataError(f"{folder}/meta.json is not an actvar token cache")
    return meta


def is_token_cache(folder: Path) -> bool:
    return (folder / "meta.json").exists() and (folder / "tokens.npy").exists()


# ---------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------


def list_image_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, class index) pairs; classes are the sorted sub-folder names (ImageNet layout)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no such data folder: {root}", "give an ImageFolder root (one sub-folder per class)")
    if (root / "train").is_dir() and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()):
        classes_root = root / "train"  # an ImageNet root with train/ and val/
    else:
        classes_root = root
    classes = sorted(d.name for d in classes_root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{classes_root} has no class sub-folders", "lay images out as ROOT/<class>/<image>.jpg")
    items = []
    for ci, name in enumerate(classes):
        for dirpath, _, files in os.walk(classes_root / name, followlinks=True):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    items.append((Path(dirpath) / f, ci))
    if not items:
        raise DataError(f"no images under {classes_root}")
    return items, classes


def train_transform(path: Path, final_reso: int, rng: np.random.Generator) -> torch.Tensor:
    """Upstream VAR's training augmentation: resize the short side to 1.125 x (Lanczos),
    random crop, to [-1, 1]. The crop offset comes from ``rng``."""
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}") from e
    mid = round(1.125 * final_reso)
    w, h = img.size
    scale = mid / min(w, h)
    img = img.resize((max(mid, round(w * scale)), max(mid, round(h * scale))), Image.Resampling.LANCZOS)
    w, h = img.size
    left = int(rng.integers(0, w - final_reso + 1))
    top = int(rng.integers(0, h - final_reso + 1))
    img = img.crop((left, top, left + final_reso, top + final_reso))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return arr.mul(2).sub(1)


class ImageFolderSource:
    """Images encoded on the fly; the crop of sample k in epoch e depends on (seed, e, k)."""

    def __init__(self, root: str | Path, vae: VQVAE, patch_nums: tuple[int, ...], seed: int, device):
        self.items, self.classes = list_image_folder(root)
        self.vae, self.patch_nums, self.seed = vae, tuple(patch_nums), seed
        self.device = torch.device(device)
        self.reso = patch_nums[-1] * vae.cfg.stride  # pixels: last-scale tokens times the VQVAE's stride
        self.description = f"ImageFolder {root} ({len(self.items)} images, {len(self.classes)} classes)"
        self.shuffle = True

    def __len__(self) -> int:
        return len(self.items)

    @torch.no_grad()
    def batch(self, items: list[tuple[int, int]]) -> TokenBatch:
        imgs, labels = [], []
        for epoch, k in items:
            path, label = self.items[k]
            rng = np.random.default_rng([self.seed, epoch, k])
            imgs.append(train_transform(path, self.reso, rng))
            labels.append(label)
        tokens = self.vae.img_to_idx(torch.stack(imgs).to(self.device))
        return TokenBatch(torch.tensor(labels, device=self.device), tokens)


def encode_image_folder(
    root: str | Path,
    vae: VQVAE,
    *,
    vae_id: str,
    out_dir: str | Path,
    patch_nums: tuple[int, ...],
    seed: int = 0,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Path:
    """Encode every image once (one seeded crop each) into a token cache folder."""
    out = Path(out_dir)
    if is_token_cache(out):
        return out  # TokenCacheSource checks that it was made with this VAE
    source = ImageFolderSource(root, vae, patch_nums, seed, device)
    n, L = len(source), sum(p * p for p in patch_nums)
    dtype = np.int16 if vae.cfg.vocab_size <= 32767 else np.int32
    tokens = np.empty((n, L), dtype=dtype)
    labels = np.empty((n,), dtype=np.int64)
    for s in range(0, n, batch_size):
        ids = list(range(s, min(n, s + batch_size)))
        b = source.batch([(0, k) for k in ids])
        tokens[s : s + len(ids)] = torch.cat(b.tokens, dim=1).cpu().numpy().astype(dtype)
        labels[s : s + len(ids)] = b.labels.cpu().numpy()
        if progress:
            progress("encoding", min(n, s + batch_size), n)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out / "tokens.npy", lambda tmp: _save_npy(tmp, tokens))
    atomic_write_with(out / "labels.npy", lambda tmp: _save_npy(tmp, labels))
    meta = {
        "format": CACHE_FORMAT,
        "source": str(Path(root).resolve()),
        "images": n,
        "classes": source.classes,
        "patch_nums": list(patch_nums),
        "vocab_size": vae.cfg.vocab_size,
        "vae_sha256": vae_id,
        "seed": seed,
        "transform": "resize short side to 1.125x (Lanczos), random crop (seeded), [-1, 1]",
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))  # written last: marks the cache complete
    return out


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


@functools.lru_cache(maxsize=2)
def epoch_permutation(n: int, epoch: int, seed: int) -> np.ndarray:
    """The order of an epoch's samples (cached: every micro-step of the epoch asks for it)."""
    return np.random.default_rng([seed, 104729, epoch]).permutation(n)


def sample_ids(
    *,
    step: int,
    micro: int,
    rank: int,
    per_process: int,
    world: int,
    global_batch: int,
    n: int,
    seed: int,
    shuffle: bool,
) -> list[tuple[int, int]]:
    """(epoch, sample id) pairs for one micro-batch of one process at one optimizer step.

    Slot ``k = step * global_batch + micro * per_process * world + rank * per_process + i``
    of the run's sample stream is sample ``perm_epoch[k % n]`` of epoch ``k // n``.
    """
    base = step * global_batch + micro * per_process * world + rank * per_process
    out = []
    perms: dict[int, np.ndarray] = {}
    for i in range(per_process):
        k = base + i
        epoch, pos = divmod(k, n)
        if shuffle:
            if epoch not in perms:
                perms[epoch] = epoch_permutation(n, epoch, seed)
            pos = int(perms[epoch][pos])
        out.append((epoch, pos))
    return out


def steps_for(epochs: float, samples_per_epoch: int, global_batch: int) -> int:
    return max(1, math.ceil(epochs * samples_per_epoch / global_batch))


def open_source(
    spec: str,
    *,
    recipe,
    teacher: VAR,
    vae: VQVAE,
    vae_id: str,
    device,
    cache_tokens: Path | None = None,
    progress: Progress | None = None,
) -> TokenSource:
    """``teacher`` (data-free), a token cache, or an ImageFolder (encoded once into ``cache_tokens``)."""
    patch_nums = teacher.cfg.patch_nums
    if spec == "shapes":
        return ShapesSource(vae, recipe.shapes_samples_per_epoch, recipe.seed, device)
    if spec == "teacher":
        opts = SamplingOptions(cfg=recipe.teacher_cfg, top_k=recipe.teacher_top_k, top_p=recipe.teacher_top_p)
        return TeacherSource(
            teacher, vae, samples_per_epoch=recipe.teacher_samples_per_epoch, opts=opts, seed=recipe.seed, device=device
        )
    path = Path(spec)
    cache = dict(vae_id=vae_id, vocab_size=vae.cfg.vocab_size, classes=teacher.num_classes)
    if is_token_cache(path):
        return TokenCacheSource(path, patch_nums, **cache)
    if cache_tokens is not None:
        cache_dir = encode_image_folder(
            path,
            vae,
            vae_id=vae_id,
            out_dir=cache_tokens,
            patch_nums=patch_nums,
            seed=recipe.seed,
            device=device,
            progress=progress,
        )
        return TokenCacheSource(cache_dir, patch_nums, **cache)
    return ImageFolderSource(path, vae, patch_nums, recipe.seed, device)
