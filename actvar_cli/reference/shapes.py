"""Shapes: a procedural, class-conditional image set that needs no download.

Each class fixes a shape and a fill pattern; colour, position, size, tilt (up to 20 degrees
from upright) and the background vary inside a class. Pairs of classes share a shape and
differ only in their fill (solid disc vs striped disc, solid square vs checkered square), so
a model must get the fine scales right for a sample to count as its class. Images are drawn
at 4x and averaged down, which gives anti-aliased edges.

Image ``k`` of a stream is a pure function of ``(stream seed, k)``: streams are unlimited,
reproducible, and the train, validation and test streams never share a seed.
"""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError

IMAGE_SIZE = 32
SUPERSAMPLE = 4
STREAM_SEEDS = {"train": 0x5EED_0001, "val": 0x5EED_0002, "test": 0x5EED_0003}

# Shapes stand upright, tilted at most MAX_TILT: at 8x8 tokens a freely rotated corner is a
# different code at every angle, and the small VAR rounds such corners off (docs/quality.md).
MAX_TILT = np.deg2rad(20)
UPRIGHT = {"triangle": -np.pi / 2, "star": -np.pi / 2, "square": np.pi / 4}  # frame angle of "upright"

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (u, v) in the shape's frame, radius 1 -> inside


def _polar(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.hypot(u, v), np.arctan2(v, u)


def _regular_polygon(sides: int) -> Mask:
    def inside(u, v):
        r, t = _polar(u, v)
        sector = np.mod(t, 2 * np.pi / sides) - np.pi / sides
        return r * np.cos(sector) <= np.cos(np.pi / sides)  # distance to the edge along its normal

    return inside


def _disc(u, v):
    return u * u + v * v <= 1.0


def _star(u, v):
    r, t = _polar(u, v)
    sector = np.abs(np.mod(t, 2 * np.pi / 5) - np.pi / 5) / (np.pi / 5)  # 0 at a tip, 1 between tips
    return r <= 1.0 - 0.55 * sector


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.5**2)


def _plus(u, v):
    arm = 0.36
    return ((np.abs(u) <= 1) & (np.abs(v) <= arm)) | ((np.abs(v) <= 1) & (np.abs(u) <= arm))


def _heart(u, v):
    x, y = u * 1.25, -v * 1.25 + 0.25  # upright heart, centred
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


SHAPES: dict[str, Mask] = {
    "disc": _disc,
    "square": _regular_polygon(4),
    "triangle": _regular_polygon(3),
    "star": _star,
    "ring": _ring,
    "plus": _plus,
    "heart": _heart,
}

# Fill patterns in the shape's frame (pixel units): True where the second colour shows.
PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "solid": lambda u, v, p: np.zeros(u.shape, dtype=bool),
    "stripes": lambda u, v, p: np.mod(v, p) < p / 2,
    "checker": lambda u, v, p: (np.floor(u / (p / 2)) + np.floor(v / (p / 2))) % 2 == 0,
    "dots": lambda u, v, p: np.hypot(np.mod(u, p) - p / 2, np.mod(v, p) - p / 2) < p * 0.28,
}


@dataclass(frozen=True)
class ShapeClass:
    shape: str
    pattern: str

    @property
    def name(self) -> str:
        return f"{self.pattern} {self.shape}"


CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("disc", "solid"),
    ShapeClass("disc", "stripes"),
    ShapeClass("square", "solid"),
    ShapeClass("square", "checker"),
    ShapeClass("triangle", "solid"),
    ShapeClass("triangle", "dots"),
    ShapeClass("star", "solid"),
    ShapeClass("ring", "stripes"),
    ShapeClass("plus", "solid"),
    ShapeClass("heart", "dots"),
)
NUM_CLASSES = len(CLASSES)


def _colour(rng: np.random.Generator, value: tuple[float, float]) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.45, 1.0), rng.uniform(*value)
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def render(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image of class ``label`` as uint8 HWC, with everything else drawn from ``rng``."""
    if not 0 <= label < NUM_CLASSES:
        raise DataError(f"class {label} does not exist", f"shapes has classes 0..{NUM_CLASSES - 1}")
    cls = CLASSES[label]
    dark_shape = rng.random() < 0.5  # a dark shape on a light background, or the reverse
    shape_rgb = _colour(rng, (0.15, 0.45) if dark_shape else (0.7, 1.0))
    second_rgb = _colour(rng, (0.7, 1.0) if dark_shape else (0.15, 0.45))
    bg_a = _colour(rng, (0.75, 1.0) if dark_shape else (0.1, 0.35))
    bg_b = np.clip(bg_a + rng.uniform(-0.15, 0.15, 3), 0, 1)
    radius = rng.uniform(0.30, 0.44) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    angle = UPRIGHT.get(cls.shape, 0.0) + rng.uniform(-MAX_TILT, MAX_TILT)
    bg_angle = rng.uniform(0, 2 * np.pi)
    period = rng.uniform(0.15, 0.19) * size  # stripes, checks and dots: 5-6 px at size 32

    y, x = _subsample_grid(size)
    c, s = np.cos(angle), np.sin(angle)
    du, dv = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c  # the shape's frame, pixels
    inside = SHAPES[cls.shape](du / radius, dv / radius)
    second = PATTERNS[cls.pattern](du, dv, period) & inside
    cover_shape, cover_second = (_coverage(m, size) for m in (inside, second))  # size x size, 0..1

    py, px = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    ramp = ((px - size / 2) * np.cos(bg_angle) + (py - size / 2) * np.sin(bg_angle)) / size + 0.5  # 0..1 across
    img = bg_a + (bg_b - bg_a) * np.clip(ramp, 0, 1)[..., None]
    img = img * (1 - cover_shape)[..., None] + shape_rgb * (cover_shape - cover_second)[..., None]
    img = img + second_rgb * cover_second[..., None]
    return (img * 255 + 0.5).clip(0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def _subsample_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel coordinates of every sub-sample, float32, (size*SUPERSAMPLE)^2 each."""
    n = size * SUPERSAMPLE
    y, x = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / SUPERSAMPLE
    return y, x


def _coverage(mask: np.ndarray, size: int) -> np.ndarray:
    """The share of each pixel's sub-samples that are True (box-filter anti-aliasing)."""
    return mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def stream_seed(stream: str) -> int:
    if stream not in STREAM_SEEDS:
        raise DataError(f"unknown shapes stream {stream!r}", f"use one of {', '.join(STREAM_SEEDS)}")
    return STREAM_SEEDS[stream]


def image_rng(stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([stream_seed(stream), int(index)])


def label_of(stream: str, index: int) -> int:
    """Classes cycle through each block of NUM_CLASSES images in a seeded order: balanced."""
    block, pos = divmod(int(index), NUM_CLASSES)
    order = np.random.default_rng([stream_seed(stream), 7, block]).permutation(NUM_CLASSES)
    return int(order[pos])


def images(stream: str, indices: Sequence[int], labels: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) of a stream; ``labels`` overrides the stream's classes."""
    labs = [label_of(stream, i) for i in indices] if labels is None else [int(c) for c in labels]
    imgs = np.stack([render(c, image_rng(stream, i)) for i, c in zip(indices, labs)])
    return imgs, np.asarray(labs, dtype=np.int64)


def to_model_input(imgs_NHWC: np.ndarray):
    """uint8 NHWC to float (N, 3, H, W) in [-1, 1], as the VQVAE reads images."""

    return torch.from_numpy(imgs_NHWC).permute(0, 3, 1, 2).float().div(127.5).sub(1)
