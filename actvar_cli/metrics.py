"""Quality metrics: agreement with the dense teacher, and FID / IS / precision-recall.

FID, IS and precision/recall come from torch-fidelity with its Inception-v3 port of the
2015-12-05 TensorFlow graph (the ADM evaluator's network), set up as the ADM evaluator
runs (no shuffling, IS splits of 5,000 images, uint8 inputs).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SparsityPolicy
from .device import autocast
from .errors import DataError, MetricsError
from .images import IMAGE_SUFFIXES, load_png, read_npz_images
from .model import VAR
from .sampling import SamplingOptions, decode_images, generate, image_generators, image_seed
from .vqvae import VQVAE

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_ENV = "ACTVAR_INCEPTION_WEIGHTS"
EVAL_SEED_OFFSET = 1_000_003  # held-out: far from the seeds training samples use
Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------
# Agreement with the teacher (no reference data needed)
# ---------------------------------------------------------------------------


def held_out_labels(seed: int, ids: list[int], num_classes: int, device) -> torch.Tensor:
    return torch.tensor([image_seed(seed + 1, i) % num_classes for i in ids], device=device)


def held_out_rng(seed: int, ids: list[int], device) -> list[torch.Generator]:
    """The generators of held-out images: image i of evaluation ``seed``."""
    return image_generators(seed + EVAL_SEED_OFFSET, ids, device)


def held_out_batches(teacher: VAR, vae: VQVAE, num: int, batch_size: int, seed: int, device, dtype, opts):
    """(ids, labels, teacher generation, teacher-forcing input) batches sampled by the teacher,
    seeded away from every seed a training run uses."""
    eval_seed = seed + EVAL_SEED_OFFSET
    for s in range(0, num, batch_size):
        ids = list(range(s, min(num, s + batch_size)))
        labels = held_out_labels(eval_seed, ids, teacher.num_classes, device)
        with autocast(device, dtype):
            gen = generate(teacher, vae, labels, opts, rng=held_out_rng(seed, ids, device))
            x = vae.quantize.idx_to_var_input(gen.tokens)
        yield ids, labels, gen, x


@torch.no_grad()
def routing_agreement(
    student: VAR,
    teacher: VAR,
    vae: VQVAE,
    num: int = 16,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
    temperature: float = 1.0,
) -> dict[str, float]:
    """How often routers pick the experts, and selectors the tokens, that stage 1's
    pseudo-labels name (held-out teacher pyramids); with the distillation losses."""
    from .losses import stage1_loss

    device = torch.device(device)
    segments = student.sparse_segments(student.policy)
    sums: dict[str, float] = {}
    count = 0
    for _, labels, gen, x in held_out_batches(teacher, vae, num, batch_size, seed, device, dtype, SamplingOptions()):
        with autocast(device, dtype):
            out = student.forward_train(labels, x, student.policy, collect_aux=True)
            _, terms = stage1_loss(student, out, torch.cat(gen.tokens, 1), segments, 0.0, 0.0, temperature)
        for k in ("router_agreement", "selector_agreement", "dis_w", "dis_t"):
            sums[k] = sums.get(k, 0.0) + float(terms[k]) * len(labels)
        count += len(labels)
    return {k: v / count for k, v in sums.items()}


@torch.no_grad()
def teacher_agreement(
    student: VAR,
    teacher: VAR,
    vae: VQVAE,
    num: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
    policy: SparsityPolicy | None = None,
    opts: SamplingOptions = SamplingOptions(),
    psnr_images: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """On ``num`` teacher-sampled pyramids (held out from training), under teacher forcing:
    per scale, how often the student's argmax token is the teacher's and KL(teacher || student);
    and the PSNR between teacher and student images generated from the same seeds (for the
    first ``psnr_images`` of those pyramids, at most ``num``)."""
    device = torch.device(device)
    policy = policy if policy is not None else student.policy
    S = len(student.cfg.patch_nums)
    agree, kl, count = np.zeros(S), np.zeros(S), 0
    n_img = num if psnr_images is None else min(psnr_images, num)
    psnr: list[float] = []
    for ids, labels, gen, x in held_out_batches(teacher, vae, num, batch_size, seed, device, dtype, opts):
        with autocast(device, dtype):
            t_logits = teacher.forward_train(labels, x).logits.float()
            s_logits = student.forward_train(labels, x, policy).logits.float()
        t_logp, s_logp = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
        kl_tok = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # B, L
        same = (t_logits.argmax(-1) == s_logits.argmax(-1)).float()
        for si, (bg, ed) in enumerate(student.begin_ends):
            agree[si] += same[:, bg:ed].mean(1).sum().item()
            kl[si] += kl_tok[:, bg:ed].mean(1).sum().item()
        count += len(labels)
        k = max(0, min(len(ids), n_img - ids[0]))  # how many of this batch's images enter the PSNR
        if k:
            psnr += image_psnr(student, vae, gen.f_hat[:k], labels[:k], ids[:k], seed, device, dtype, policy, opts)
        if progress:
            progress("teacher forcing", count, num)
    agree, kl = agree / count, kl / count
    sparse = sorted({s - 1 for s in (policy.scales if policy else ())})
    per_scale = [
        {"scale": si + 1, "tokens": pn * pn, "sparse": si in sparse, "token_agreement": agree[si], "logit_kl": kl[si]}
        for si, pn in enumerate(student.cfg.patch_nums)
    ]
    result: dict[str, Any] = {
        "num": num,
        "token_agreement": float(np.mean([agree[i] for i in sparse])) if sparse else float(agree.mean()),
        "logit_kl": float(np.mean([kl[i] for i in sparse])) if sparse else float(kl.mean()),
        "token_agreement_all_scales": float(agree.mean()),
        "logit_kl_all_scales": float(kl.mean()),
        "per_scale": per_scale,
    }
    if psnr:
        result["psnr_db"] = float(np.mean(psnr))
    return result


@torch.no_grad()
def image_psnr(student, vae, teacher_fhat, labels, ids, seed, device, dtype, policy, opts) -> list[float]:
    """PSNR (dB) of each teacher image against the student's image from the same per-image seed."""
    with autocast(device, dtype):
        gen = generate(student, vae, labels, opts, rng=held_out_rng(seed, ids, device), policy=policy)
    mse = (decode_images(vae, teacher_fhat) - decode_images(vae, gen.f_hat)).square().flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).tolist()


# ---------------------------------------------------------------------------
# FID / IS / precision-recall
# ---------------------------------------------------------------------------


class ImageSet(torch.utils.data.Dataset):
    """uint8 [3, H, W] images from a folder of image files or an .npz (``arr_0``, NHWC)."""

    def __init__(self, source: str | os.PathLike):
        path = Path(source)
        self.path = path
        if path.is_dir():
            self.files = sorted(
                p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png"
            )
            if not self.files:
                raise DataError(f"no images in {path}")
            self.array = None
        elif path.suffix == ".npz":
            self.files = None
            self.array = read_npz_images(path)
            if self.array.ndim != 4 or self.array.shape[-1] != 3:
                raise DataError(f"{path}: arr_0 has shape {self.array.shape}, expected N x H x W x 3")
        else:
            raise DataError(f"{path} is neither an image folder nor an .npz batch")

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = load_png(self.files[i]) if self.files is not None else np.asarray(self.array[i])
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy

    def fingerprint(self) -> str:
        """Changes when the reference changes: name, size and modification time."""
        if self.files is not None:
            stat = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in self.files]
        else:
            st = self.path.stat()
            stat = [(self.path.name, st.st_size, int(st.st_mtime))]
        return hashlib.sha256(repr(stat).encode()).hexdigest()[:16]


def inception_weights(explicit: str | os.PathLike | None = None) -> str | None:
    """The weights file to give torch-fidelity, checked to hold only tensors.

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
    candidates = [*named, torch_home / "hub" / "checkpoints" / INCEPTION_FILE]
    for c in candidates:
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


def fidelity(
    samples: str | os.PathLike,
    ref: str | os.PathLike,
    fid: bool = True,
    isc: bool = False,
    prc: bool = False,
    weights: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> dict[str, float]:
    """FID / IS / precision / recall of ``samples`` against ``ref`` (folders of images or ADM .npz)."""
    import torch_fidelity

    gen, reference = ImageSet(samples), ImageSet(ref)
    weights_path = inception_weights(weights)
    ref_path = Path(ref)
    cache_root = (ref_path if ref_path.is_dir() else ref_path.parent) / ".actvar-fidelity-cache"
    kwargs = dict(
        input1=gen,
        input2=reference,
        fid=fid or prc,  # the reference features are cached with FID
        isc=isc,
        prc=prc,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=weights_path,
        samples_shuffle=False,
        isc_splits=max(1, len(gen) // 5000),
        cuda=torch.device(device).type == "cuda",
        batch_size=batch_size,
        save_cpu_ram=True,
        verbose=False,
        cache=True,
        cache_root=str(cache_root),
        input2_cache_name=f"ref-{ref_path.stem}-{reference.fingerprint()}",
    )
    try:
        metrics = torch_fidelity.calculate_metrics(**kwargs)
    except OSError as e:  # urllib's URLError is an OSError: only with --inception-weights auto
        raise MetricsError(
            f"torch-fidelity could not download {INCEPTION_FILE}: {e}",
            f"fetch {INCEPTION_URL} and pass --inception-weights PATH",
        ) from e
    out = {}
    if fid:
        out["fid"] = float(metrics["frechet_inception_distance"])
    if isc:
        out["inception_score"] = float(metrics["inception_score_mean"])
        out["inception_score_std"] = float(metrics["inception_score_std"])
    if prc:
        out["precision"] = float(metrics["precision"])
        out["recall"] = float(metrics["recall"])
    return out
