"""Exporting and measuring the reference model: the numbers docs/quality.md reports.

Measured on the exported fp16 weights (loaded back as float32), so the numbers describe
exactly what ships: reconstruction PSNR and classifier accuracy on held-out images of the
test stream, and the class accuracy of the VAR's samples with upstream's recipe.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..generation.sampling import SamplingOptions, decode_images, generate, image_generators
from ..models.builtin import WEIGHT_FILES
from ..models.checkpoint import load_vae, load_var, save_safetensors
from ..progress import Progress
from . import shapes
from .classifier import ShapesClassifier, load_classifier


def export_weights(out: Path, var, vae, clf: ShapesClassifier) -> dict[str, Path]:
    """fp16 safetensors with the configuration in the metadata."""

    paths = {}
    for key, module, meta in (
        ("var", var, {"format": "actvar", "kind": "var", "var_config": var.cfg.to_dict()}),
        ("vae", vae, {"format": "actvar", "kind": "vqvae", "vae_config": vae.cfg.to_dict()}),
        ("classifier", clf, {"format": "actvar", "kind": "classifier"}),
    ):
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in module.state_dict().items()}
        paths[key] = out / WEIGHT_FILES[key]
        save_safetensors(sd, paths[key], meta)
    return paths


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of images in [-1, 1], measured on the [0, 1] scale."""
    mse = ((a - b) * 0.5).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


@torch.no_grad()
def measure(folder: Path, num: int, seed: int, progress: Progress | None = None) -> dict[str, Any]:

    var, _ = load_var(folder / WEIGHT_FILES["var"])
    vae, _ = load_vae(folder / WEIGHT_FILES["vae"], var.cfg.patch_nums)
    clf = load_classifier(folder / WEIGHT_FILES["classifier"])
    rec_psnr, ae_psnr, clean_ok, rec_ok, sample_ok = [], [], [], [], []
    for s in range(0, num, 50):
        ids = list(range(s, min(num, s + 50)))
        imgs, labels = shapes.images("test", ids)
        x, y = shapes.to_model_input(imgs), torch.from_numpy(labels)
        rec = vae.idx_to_img(vae.img_to_idx(x))
        rec_psnr.append(psnr_db(rec, x))
        ae_psnr.append(psnr_db(vae.fhat_to_img(vae.quant_conv(vae.encoder(x))), x))
        clean_ok.append(clf(x)[1].argmax(-1) == y)
        rec_ok.append(clf(rec)[1].argmax(-1) == y)
        want = torch.tensor([i % var.num_classes for i in ids])
        gen = generate(var, vae, want, SamplingOptions(), rng=image_generators(seed, ids, "cpu"))
        sample_ok.append(clf(decode_images(vae, gen.f_hat) * 2 - 1)[1].argmax(-1) == want)
        if progress:
            progress("measure", ids[-1] + 1, num)
    cat = torch.cat
    return {
        "images": num,
        "vqvae_psnr_db": float(cat(rec_psnr).mean()),
        "vqvae_psnr_db_of_mean_mse": 10 * math.log10(1 / float((10 ** (-cat(rec_psnr) / 10)).mean())),
        "autoencoder_psnr_db_without_quantisation": float(cat(ae_psnr).mean()),
        "classifier_accuracy": float(cat(clean_ok).float().mean()),
        "classifier_accuracy_on_reconstructions": float(cat(rec_ok).float().mean()),
        "var_sample_class_accuracy": float(cat(sample_ok).float().mean()),
        "sampling": "cfg 1.5, top-k 900, top-p 0.96, per-image seeds (seed, i), classes i % 10",
    }
