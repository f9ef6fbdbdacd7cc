"""``eval``: FID / IS / precision-recall against reference images, and agreement with the teacher.

Sampling for FID is resumable (PNGs on disk are kept when the folder's record matches) and
shards over processes started by ``accelerate launch``: each rank makes its share of the
canonical batches, and rank 0 gathers the files into ``samples.npz`` and scores them.
Everything that can be checked (reference, Inception weights, classes, output folder) is
checked before the first image is sampled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agreement import teacher_agreement
from .checkpoint import atomic_write_text, check_pair, load_vae, load_var, source_id
from .errors import ConfigError
from .fidelity import SHAPES_REF, check_reference, fidelity, yardstick_for
from .flops import count_flops
from .hub import find_teacher, find_vae, resolve_local
from .policy import SparsityPolicy
from .progress import Progress
from .sample_job import SampleJob, finish_outputs, job_record, prepare_out_dir, run_sample_job
from .sampling import SamplingOptions

FID_IMAGES_PER_CLASS = 50  # upstream's FID protocol: 50 images of each ImageNet class
TEACHER_PYRAMIDS = 32


@dataclass
class EvalJob:
    model: str
    vae: str | None  # None: the VAE recorded in the model, or the cached official one
    out_dir: Path
    fid: bool = False
    isc: bool = False
    prc: bool = False
    ref: str | None = None  # a folder, an ADM .npz, or "shapes"
    teacher: str | None = None  # teacher agreement when set (or "auto": the model's base checkpoint)
    num: int | None = None  # images (FID) and pyramids (teacher); None: 50 per class / 32
    psnr_images: int | None = None
    classes: list[int] | None = None  # None: all of the model's classes, evenly
    opts: SamplingOptions = field(default_factory=SamplingOptions)
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    inception_weights: str | None = None
    dense: bool = False  # evaluate an ActVAR model with every token and expert active
    overwrite: bool = False  # replace another run's samples in the output folder
    compile: bool = False  # torch.compile each scale's step

    def validate(self) -> None:
        if (self.fid or self.prc) and not self.ref:
            raise ConfigError("--fid and --prc need reference images", "pass --ref shapes, a folder or an ADM .npz")
        if not (self.fid or self.isc or self.prc or self.teacher):
            raise ConfigError("nothing to evaluate", "ask for --fid/--is/--prc, or --teacher")
        if self.num is not None and self.num < 1:
            raise ConfigError(f"--num {self.num}: must be at least 1")
        if self.psnr_images is not None and self.psnr_images < 0:
            raise ConfigError(f"--psnr-images {self.psnr_images}: must be 0 or more")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        self.opts.validate()
        if self.ref:
            check_reference(self.ref)
            if self.fid or self.isc or self.prc:
                yardstick_for(self.ref, self.inception_weights)  # Inception weights are there and sound


def sample_job_for(job: EvalJob, num_classes: int) -> SampleJob:
    classes = job.classes if job.classes is not None else list(range(num_classes))
    num = job.num if job.num is not None else FID_IMAGES_PER_CLASS * len(classes)
    sample_job = SampleJob.evenly(classes, num, seed=job.seed, batch_size=job.batch_size, opts=job.opts)
    sample_job.validate(num_classes)
    return sample_job


def _fidelity_part(job: EvalJob, model, vae, info, policy, state, device, dtype, progress) -> dict[str, Any]:
    sample_job = sample_job_for(job, model.num_classes)
    samples = Path(job.out_dir) / "samples"
    record = job_record(sample_job, source_id(info.source), source_id(job.vae), policy, dtype)
    prepare_out_dir(samples, record, job.overwrite, state.is_main_process)
    state.wait_for_everyone()
    on_sample = progress if state.is_main_process else None
    run_sample_job(
        model, vae, sample_job, samples, device, dtype, policy, on_sample, state.process_index, state.num_processes
    )
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    _, npz = finish_outputs(sample_job, samples, npz=True, grid=True)
    results: dict[str, Any] = {
        "sampling": {
            "images": sample_job.total,
            "processes": state.num_processes,
            "seed": job.seed,
            **job.opts.__dict__,
        },
        "samples_npz": str(npz),
    }
    ref = job.ref or SHAPES_REF
    results.update(
        fidelity(npz, ref, job.fid, job.isc, job.prc, job.inception_weights, device, labels=sample_job.labels)
    )
    return results


def run_eval(job: EvalJob, progress: Progress | None = None) -> dict[str, Any] | None:
    """Returns the results on the main process (None on the others); writes ``eval.json``."""
    from accelerate import PartialState

    from .device import pick_device, resolve_dtype, use_cuda

    job.validate()
    state = PartialState(cpu=not use_cuda(job.device))
    device = state.device if job.device == "auto" else pick_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    model, info = load_var(resolve_local(job.model))
    vae_src = find_vae(info.metadata, job.vae)
    vae, _ = load_vae(vae_src, model.cfg.patch_nums)
    check_pair(model.cfg, vae)
    teacher_src = find_teacher(info.metadata, None if job.teacher == "auto" else job.teacher) if job.teacher else None
    model.to(device), vae.to(device)
    if job.compile:
        from .sampling import compile_steps

        compile_steps(model)
    policy = SparsityPolicy.dense() if job.dense or model.policy is None else model.policy
    flops = count_flops(model.cfg.replace(num_experts=0), policy, model.cfg.num_experts or 16)
    results: dict[str, Any] = {"model": info.name, "kind": info.kind, "policy": policy.to_dict()}
    results["flops"] = {"dense_flops": flops.dense_flops, "sparse_flops": flops.sparse_flops, "savings": flops.savings}
    if job.fid or job.isc or job.prc:
        job.vae = vae_src
        results.update(_fidelity_part(job, model, vae, info, policy, state, device, dtype, progress))
    if teacher_src and state.is_main_process:
        teacher, _ = load_var(teacher_src)
        teacher.to(device)
        num = job.num if job.num is not None else TEACHER_PYRAMIDS
        results["teacher"] = teacher_src
        results.update(
            teacher_agreement(
                model,
                teacher,
                vae,
                num,
                job.batch_size,
                job.seed,
                device,
                dtype,
                policy,
                job.opts,
                job.psnr_images,
                progress,
            )
        )
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(results, indent=1, default=float))
    results["eval_json"] = str(out / "eval.json")
    return results


def default_out_dir(model: str) -> Path:
    return Path(f"eval-{Path(model).stem}")
