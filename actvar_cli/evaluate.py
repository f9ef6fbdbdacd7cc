"""``eval``: FID / IS / precision-recall against reference images, and agreement with the teacher.

Sampling for FID is resumable (PNGs on disk are kept) and shards over processes started by
``accelerate launch``: each rank makes its share of image indices, and rank 0 gathers the
files into ``samples.npz`` and scores them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_text, check_pair, load_vae, load_var
from .config import SparsityPolicy
from .errors import ConfigError
from .flops import count_flops
from .hub import find_teacher, find_vae, resolve_local
from .metrics import fidelity, teacher_agreement
from .sample_job import SampleJob, finish_outputs, run_sample_job
from .sampling import SamplingOptions

Progress = Callable[[str, int, int], None]


@dataclass
class EvalJob:
    model: str
    vae: str | None  # None: the VAE recorded in the model, or the cached official one
    out_dir: Path
    fid: bool = False
    isc: bool = False
    prc: bool = False
    ref: str | None = None
    teacher: str | None = None  # teacher agreement when set (or "auto": the model's base checkpoint)
    num: int = 32  # teacher-agreement pyramids
    psnr_images: int | None = None
    classes: list[int] = field(default_factory=lambda: list(range(1000)))
    num_per_class: int = 50
    opts: SamplingOptions = field(default_factory=SamplingOptions)
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    inception_weights: str | None = None
    dense: bool = False  # evaluate an ActVAR model with every token and expert active


def run_eval(job: EvalJob, progress: Progress | None = None) -> dict[str, Any] | None:
    """Returns the results on the main process (None on the others); writes ``eval.json``."""
    from accelerate import PartialState

    from .device import pick_device, resolve_dtype

    if (job.fid or job.prc) and not job.ref:
        raise ConfigError(
            "--fid and --prc need reference images", "pass --ref VIRTUAL_imagenet256_labeled.npz or a folder"
        )
    if not (job.fid or job.isc or job.prc or job.teacher):
        raise ConfigError("nothing to evaluate", "ask for --fid/--is/--prc, or --teacher")
    use_cuda = torch.cuda.is_available() and job.device not in ("cpu",)
    state = PartialState(cpu=not use_cuda)
    device = state.device if job.device == "auto" else pick_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    model, info = load_var(resolve_local(job.model))
    vae, _ = load_vae(find_vae(info.metadata, job.vae), model.cfg.patch_nums)
    check_pair(model.cfg, vae)
    model.to(device)
    vae.to(device)
    policy = SparsityPolicy.dense() if job.dense or model.policy is None else model.policy
    results: dict[str, Any] = {"model": info.name, "kind": info.kind, "policy": policy.to_dict()}
    flops = count_flops(model.cfg.replace(num_experts=0), policy, model.cfg.num_experts or 16)
    results["flops"] = {"dense_flops": flops.dense_flops, "sparse_flops": flops.sparse_flops, "savings": flops.savings}
    out = Path(job.out_dir)

    if job.fid or job.isc or job.prc:
        sample_job = SampleJob(
            classes=job.classes,
            num_per_class=job.num_per_class,
            seed=job.seed,
            batch_size=job.batch_size,
            opts=job.opts,
        )
        samples = out / "samples"

        def on_sample(done: int, total: int) -> None:
            if progress and state.is_main_process:
                progress("sampling", done, total)

        res = run_sample_job(
            model, vae, sample_job, samples, device, dtype, policy, on_sample, state.process_index, state.num_processes
        )
        state.wait_for_everyone()
        results["sampling"] = {
            "images": sample_job.total,
            "images_per_s_this_process": res.images_per_s,
            "processes": state.num_processes,
            "recipe": {"cfg": job.opts.cfg, "top_k": job.opts.top_k, "top_p": job.opts.top_p, "seed": job.seed},
        }
        if state.is_main_process:
            _, npz = finish_outputs(sample_job, samples, npz=True, grid=True)
            results["samples_npz"] = str(npz)
            results.update(
                fidelity(npz, job.ref or npz, job.fid, job.isc, job.prc, job.inception_weights, device)
                if job.ref
                else fidelity(npz, npz, False, job.isc, False, job.inception_weights, device)
            )
    if job.teacher and state.is_main_process:
        teacher_src = find_teacher(info.metadata, None if job.teacher == "auto" else job.teacher)
        teacher, _ = load_var(teacher_src)
        teacher.to(device)
        results["teacher"] = teacher_src
        results.update(
            teacher_agreement(
                model,
                teacher,
                vae,
                job.num,
                job.batch_size,
                job.seed,
                device,
                dtype,
                policy,
                job.opts,
                job.psnr_images,
                progress,
            )  # fmt: skip
        )
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(results, indent=1, default=float))
    results["eval_json"] = str(out / "eval.json")
    return results
