"""``actvar sample``: class-conditional images into a folder; resumable and shardable."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..files import FolderLock
from ..generation.jobs import (
    SampleJob,
    check_disk_space,
    claimed_folder,
    default_classes,
    finish_outputs,
    job_record,
    run_sample_job,
)
from ..generation.sampling import SamplingOptions, compile_steps
from ..progress import Progress
from ..runtime import Runtime
from .loading import load_models
from .result import Result


@dataclass
class SampleRequest:
    model: str
    out_dir: Path
    vae: str | None = None
    classes: list[int] | None = None  # None: four ImageNet classes, or the first ten of a smaller model
    num_per_class: int = 1
    opts: SamplingOptions = field(default_factory=SamplingOptions)
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    npz: bool = False
    upstream_seeding: bool = False
    dense: bool = False  # an ActVAR model with every token and expert active
    overwrite: bool = False
    num_heads: int | None = None
    compile: bool = False


@dataclass
class SampleResult(Result):
    out_dir: str
    model: str
    kind: str
    images: int
    generated: int
    skipped: int
    seconds: float
    images_per_s: float
    device: str
    dtype: str
    grid: str | None
    npz: str | None


def run(req: SampleRequest, progress: Progress | None = None) -> SampleResult:
    """Check everything, make the missing images, then the grid (and the npz)."""
    req.opts.validate()
    runtime = Runtime.pick(req.device, req.dtype)
    loaded = load_models(req.model, vae=req.vae, runtime=runtime, num_heads=req.num_heads)
    model = loaded.model
    classes = req.classes if req.classes is not None else default_classes(model.num_classes)
    job = SampleJob.blocks(
        classes,
        req.num_per_class,
        seed=req.seed,
        batch_size=req.batch_size,
        opts=req.opts,
        upstream_seeding=req.upstream_seeding,
    )
    job.validate(model.num_classes)
    check_disk_space(req.out_dir, job.total, 3 * model.cfg.image_size**2)
    policy = None if req.dense else model.policy
    record = job_record(job, loaded.model_id, loaded.vae_id, policy, runtime.dtype)
    with FolderLock(req.out_dir), claimed_folder(req.out_dir, record, overwrite=req.overwrite):
        if req.compile:
            compile_steps(model)
        result = run_sample_job(model, loaded.vae, job, req.out_dir, runtime=runtime, policy=policy, progress=progress)
        grid, npz = finish_outputs(job, req.out_dir, req.npz)
    return SampleResult(
        out_dir=str(result.out_dir),
        model=loaded.info.name,
        kind=loaded.info.kind,
        images=job.total,
        generated=result.generated,
        skipped=result.skipped,
        seconds=round(result.seconds, 3),
        images_per_s=round(result.images_per_s, 3),
        device=str(runtime.device),
        dtype=runtime.dtype,
        grid=str(grid) if grid else None,
        npz=str(npz) if npz else None,
    )
