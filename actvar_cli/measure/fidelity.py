"""FID, IS and precision/recall through torch-fidelity, on two yardsticks.

* ImageNet: torch-fidelity's Inception-v3 port of the 2015-12-05 TensorFlow graph (the ADM
  evaluator's network), run as the ADM evaluator runs (no shuffling, IS splits of 5,000).
* ``shapes``: the reference model's classifier, registered with torch-fidelity as the
  ``actvar-shapes`` extractor, against fresh images of the shapes test stream; it also gives
  ``class_accuracy``, the share of samples showing the class they were generated for.

Both go through the same code: torch-fidelity's registered extractor gives the features and
torch-fidelity's own functions turn them into metrics. Reference features are cached as
``.npz`` arrays (read with ``allow_pickle=False``) in actvar's cache folder; torch-fidelity's
own cache, which it unpickles with ``weights_only=False``, is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, MetricsError, OutputError
from ..files import atomic_write_with
from ..generation.images import IMAGE_SUFFIXES, image_size, load_png, read_npz_images
from ..progress import Progress
from ..reference import shapes
from ..reference.classifier import register_with_fidelity, shipped_classifier_sha

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_ENV = "ACTVAR_INCEPTION_WEIGHTS"
SHAPES_REF = "shapes"
SHAPES_REF_IMAGES = 2000  # images of the test stream the shapes statistics are computed on
CACHE_ENV = "ACTVAR_CACHE"
MIN_IMAGES = 2  # a covariance needs two


class ImageSet(torch.utils.data.Dataset):
    """uint8 [3, H, W] images from a folder of image files or an .npz (``arr_0``, uint8 NHWC)."""

    def __init__(self, source: str | os.PathLike):
        path = Path(source)
        self.path = path
        self.files: list[Path] | None = None
        self.array: np.ndarray | None = None
        if path.is_dir():
            self.files = sorted(
                p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png"
            )
            sizes = {image_size(p) for p in self.files}  # every header read now, not after sampling
            if len(sizes) > 1:
                raise DataError(f"{path} holds images of {len(sizes)} sizes", "give images of one size")
        elif path.suffix == ".npz" and path.exists():
            self.array = read_npz_images(path)
        else:
            raise DataError(
                f"{path} is neither an image folder nor an .npz batch", "give a folder, an .npz or `shapes`"
            )

        if len(self) < MIN_IMAGES:
            raise DataError(f"{path} holds {len(self)} images", f"FID and precision/recall need at least {MIN_IMAGES}")

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = load_png(self.files[i]) if self.files is not None else np.asarray(self.array[i])
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy

    def fingerprint(self) -> str:
        """Changes when the reference changes: names, sizes and modification times."""
        files = self.files if self.files is not None else [self.path]
        stat = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return hashlib.sha256(repr(stat).encode()).hexdigest()[:16]


class ArraySet(torch.utils.data.Dataset):
    """uint8 [3, H, W] images from an array of uint8 NHWC images held in memory."""

    def __init__(self, images_NHWC: np.ndarray):
        self.array = images_NHWC

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[i], dtype=np.uint8)).permute(2, 0, 1)


class ShapesReference(torch.utils.data.Dataset):
    """The first ``n`` images of the shapes test stream, drawn on demand."""

    def __init__(self, n: int = SHAPES_REF_IMAGES):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:

        return torch.from_numpy(shapes.render(shapes.label_of("test", i), shapes.image_rng("test", i))).permute(2, 0, 1)

    def fingerprint(self) -> str:

        return f"shapes-test-{self.n}-{shapes.IMAGE_SIZE}"


@dataclass(frozen=True)
class Yardstick:
    """A torch-fidelity feature extractor and the layer each metric reads."""

    extractor: str
    weights: str | None  # weights file given to the extractor (Inception); None: its own
    fid_layer: str
    isc_layer: str
    sha: str  # identifies the network's weights, for the reference cache

    @property
    def layers(self) -> list[str]:
        return sorted({self.fid_layer, self.isc_layer})


def check_reference(ref: str) -> None:
    """Fail before any sampling when the reference cannot be read."""
    if ref != SHAPES_REF:
        ImageSet(ref)


def yardstick_for(ref: str, weights: str | None) -> Yardstick:
    if ref == SHAPES_REF:
        return Yardstick(register_with_fidelity(), None, "features", "logits", shipped_classifier_sha())
    path = inception_weights(weights)
    return Yardstick("inception-v3-compat", path, "2048", "logits_unbiased", Path(path).name if path else "download")


def reference_set(ref: str):
    return ShapesReference() if ref == SHAPES_REF else ImageSet(ref)


def extract(images: torch.utils.data.Dataset, ys: Yardstick, device, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Features of every image, through torch-fidelity's registered extractor."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    cuda = torch.device(device).type == "cuda"
    try:
        fe = create_feature_extractor(
            ys.extractor, ys.layers, cuda=cuda, feature_extractor_weights_path=ys.weights, verbose=False
        )
    except OSError as e:  # urllib's URLError is an OSError: only with --inception-weights auto
        raise MetricsError(
            f"torch-fidelity could not download {INCEPTION_FILE}: {e}",
            f"fetch {INCEPTION_URL} and pass --inception-weights PATH",
        ) from e
    feats = get_featuresdict_from_dataset(images, fe, batch_size, cuda, save_cpu_ram=True, verbose=False)
    return {k: v.cpu().numpy() for k, v in feats.items()}


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "actvar"
    return Path(root) / "fidelity"


def check_cache_writable() -> None:
    """The reference features are cached after sampling: the cache folder must be usable before it."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputError(
            f"the metrics cache {folder} cannot be written ({e.strerror})", f"set {CACHE_ENV} to a writable folder"
        ) from e


def cache_path(ref: str, images, ys: Yardstick) -> Path:
    """Where a reference's features are kept: named by the reference, its content and the network."""
    key = hashlib.sha256(json.dumps([images.fingerprint(), ys.extractor, ys.sha, ys.layers]).encode()).hexdigest()[:20]
    return cache_dir() / f"{Path(str(ref)).stem}-{key}.npz"


def reference_features(ref: str, ys: Yardstick, device, batch_size: int = 64) -> dict[str, np.ndarray]:
    """The reference's features, computed once and kept as an .npz of plain arrays."""

    images = reference_set(ref)
    path = cache_path(ref, images, ys)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                feats = {k: z[k] for k in ys.layers}
            if all(v.ndim == 2 and len(v) == len(images) for v in feats.values()):
                return feats
        except (OSError, ValueError, KeyError):
            pass  # unreadable or from another version: computed again below
    feats = extract(images, ys, device, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: _save_npz(tmp, feats))
    return feats


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def fidelity(
    samples: torch.utils.data.Dataset | str | os.PathLike,
    ref: str,
    *,
    fid: bool = True,
    isc: bool = False,
    prc: bool = False,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    labels: list[int] | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """FID / IS / precision / recall of ``samples`` against ``ref`` (a folder, an ADM .npz or
    ``shapes``); with the shapes yardstick and ``labels``, also ``class_accuracy``."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    ys = yardstick_for(ref, weights)
    gen_set = samples if isinstance(samples, torch.utils.data.Dataset) else ImageSet(samples)
    gen = extract(gen_set, ys, device, batch_size)
    out: dict[str, Any] = {"yardstick": ys.extractor, "images": len(gen_set)}
    if fid or prc:
        real = reference_features(ref, ys, device, batch_size)
        out["reference_images"] = len(next(iter(real.values())))
    if fid:
        s1, s2 = (fid_features_to_statistics(torch.from_numpy(f[ys.fid_layer])) for f in (gen, real))
        out["fid"] = float(fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"])
    if isc:
        splits = max(1, len(gen_set) // 5000)
        score = isc_features_to_metric(torch.from_numpy(gen[ys.isc_layer]), splits=splits, shuffle=False)
        out["inception_score"] = float(score["inception_score_mean"])
        out["inception_score_std"] = float(score["inception_score_std"])
    if prc:
        pr = prc_features_to_metric(
            torch.from_numpy(gen[ys.fid_layer]), torch.from_numpy(real[ys.fid_layer]), save_cpu_ram=True, verbose=False
        )
        out["precision"], out["recall"] = float(pr["precision"]), float(pr["recall"])
    if ref == SHAPES_REF and labels is not None:
        out["class_accuracy"] = float(np.mean(gen[ys.isc_layer].argmax(1) == np.asarray(labels)))
    return out


def inception_weights(explicit: str | os.PathLike | None = None) -> str | None:
    """The Inception weights file to give torch-fidelity, checked to hold only tensors.

    Looked for in ``explicit``, ``$ACTVAR_INCEPTION_WEIGHTS`` and torch's hub cache. Nothing is
    downloaded unless ``explicit`` is ``"auto"`` (then torch-fidelity fetches it, and None is
    returned). torch-fidelity unpickles the file with ``weights_only=False``; loading it here
    first with ``weights_only=True`` guarantees there is nothing but tensors in it.
    """
    if explicit == "auto":
        return None
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    named = [c for c in (explicit, os.environ.get(INCEPTION_ENV)) if c]
    for c in named:
        if not Path(c).exists():
            raise MetricsError(f"Inception weights not found: {c}", f"fetch {INCEPTION_URL}")
    for c in [*named, torch_home / "hub" / "checkpoints" / INCEPTION_FILE]:
        if Path(c).exists():
            try:
                sd = torch.load(c, map_location="cpu", weights_only=True)
            except Exception as e:
                raise MetricsError(f"{c} is not a plain Inception state dict", f"fetch {INCEPTION_URL}") from e
            if not isinstance(sd, dict) or "fc.weight" not in sd:
                raise MetricsError(f"{c} does not hold torch-fidelity's Inception-v3 weights", f"fetch {INCEPTION_URL}")
            return str(c)
    raise MetricsError(
        f"the Inception weights {INCEPTION_FILE} are not on this machine",
        f"fetch {INCEPTION_URL} and pass --inception-weights PATH (or set {INCEPTION_ENV}), "
        "or pass --inception-weights auto to let torch-fidelity download it",
    )
