"""``actvar eval``: FID / IS / precision-recall against reference images, and agreement with the teacher.

Sampling for FID is resumable (PNGs on disk are kept when the folder's record matches) and
shards over processes started by ``accelerate launch``: each rank makes its share of the
canonical batches, and rank 0 gathers the files into ``samples.npz`` and scores them.
Everything that can be checked (reference, Inception weights, classes, output folder) is
checked before the first image is sampled.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState

from ..errors import ConfigError, OutputError
from ..files import FolderLock, atomic_write_text
from ..generation.jobs import SampleJob, check_disk_space, claimed_folder, finish_outputs, job_record, run_sample_job
from ..generation.sampling import SamplingOptions, compile_steps
from ..measure.agreement import teacher_agreement
from ..measure.fidelity import SHAPES_REF, check_cache_writable, check_reference, fidelity, yardstick_for
from ..progress import Progress
from ..runtime import Runtime, pick_device, use_cuda
from ..sparsity.flops import count_flops
from ..sparsity.policy import SparsityPolicy
from .loading import Loaded, load_models
from .result import Result

FID_IMAGES_PER_CLASS = 50  # upstream's FID protocol: 50 images of each ImageNet class
TEACHER_PYRAMIDS = 32


@dataclass
class EvalRequest:
    model: str
    out_dir: Path | None = None  # None: eval-<model>/
    vae: str | None = None  # None: the VAE recorded in the model, or the cached official one
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

    @property
    def scores_images(self) -> bool:
        return self.fid or self.isc or self.prc

    def validate(self) -> None:
        if (self.fid or self.prc) and not self.ref:
            raise ConfigError("--fid and --prc need reference images", "pass --ref shapes, a folder or an ADM .npz")
        if not (self.scores_images or self.teacher):
            raise ConfigError("nothing to evaluate", "ask for --fid/--is/--prc, or --teacher")
        if self.num is not None and self.num < 1:
            raise ConfigError(f"--num {self.num}: must be at least 1")
        if (self.fid or self.prc) and self.num is not None and self.num < 2:
            raise ConfigError(f"--num {self.num}: FID and precision/recall need at least 2 samples")
        if self.psnr_images is not None and self.psnr_images < 0:
            raise ConfigError(f"--psnr-images {self.psnr_images}: must be 0 or more")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        self.opts.validate()
        if self.ref:
            check_reference(self.ref)
            if self.scores_images:
                yardstick_for(self.ref, self.inception_weights)  # Inception weights are there and sound


@dataclass
class EvalResult(Result):
    results: dict[str, Any]  # what eval.json holds, and its path

    def to_dict(self) -> dict[str, Any]:
        return self.results


def default_out_dir(model: str) -> Path:
    return Path(f"eval-{Path(model).stem}")


def run(req: EvalRequest, progress: Progress | None = None) -> EvalResult | None:
    """The results on the main process (None on the others); writes ``eval.json``."""
    req.validate()
    state = PartialState(cpu=not use_cuda(req.device))
    runtime = Runtime.pick(state.device if req.device == "auto" else pick_device(req.device), req.dtype)
    loaded = load_models(req.model, vae=req.vae, teacher=req.teacher, runtime=runtime)
    out = Path(req.out_dir or default_out_dir(req.model))
    check_owner(out, loaded.model_id, req.overwrite)
    if req.scores_images:
        check_disk_space(out, sample_job_for(req, loaded.model.num_classes).total, 3 * loaded.model.cfg.image_size**2)
        check_cache_writable()
    with FolderLock(out) if state.is_main_process else contextlib.nullcontext():
        return _evaluate(req, loaded, out, state=state, runtime=runtime, progress=progress)


def check_owner(out: Path, model_id: str, overwrite: bool) -> None:
    """An eval folder holds one model's evaluation: another model's is refused (or, with
    ``--overwrite``, its samples are discarded)."""
    old = out / "eval.json"
    if not old.exists():
        return
    try:
        recorded = json.loads(old.read_text()).get("model_id")
    except (OSError, ValueError, AttributeError):
        recorded = "unreadable"
    if recorded == model_id:
        return
    if not overwrite:
        raise OutputError(
            f"{out} holds the evaluation of another model", "choose another --out, or pass --overwrite to replace it"
        )
    shutil.rmtree(out / "samples", ignore_errors=True)
    old.unlink(missing_ok=True)


def _evaluate(req: EvalRequest, loaded: Loaded, out: Path, *, state, runtime: Runtime, progress) -> EvalResult | None:
    model = loaded.model
    if req.compile:
        compile_steps(model)
    policy = SparsityPolicy.dense() if req.dense or model.policy is None else model.policy
    flops = count_flops(model.cfg.replace(num_experts=0), policy, model.cfg.num_experts or 16)
    results: dict[str, Any] = {"model": loaded.info.name, "model_id": loaded.model_id, "kind": loaded.info.kind}
    results["policy"] = policy.to_dict()
    results["flops"] = {"dense_flops": flops.dense_flops, "sparse_flops": flops.sparse_flops, "savings": flops.savings}
    if req.scores_images:
        results.update(_fidelity_part(req, loaded, out, policy=policy, state=state, runtime=runtime, progress=progress))
    if loaded.teacher is not None and state.is_main_process:
        results["teacher"] = loaded.teacher_source
        results.update(
            teacher_agreement(
                model,
                loaded.teacher,
                loaded.vae,
                num=req.num if req.num is not None else TEACHER_PYRAMIDS,
                batch_size=req.batch_size,
                seed=req.seed,
                runtime=runtime,
                policy=policy,
                opts=req.opts,
                psnr_images=req.psnr_images,
                progress=progress,
            )
        )
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(results, indent=1, default=float))
    results["eval_json"] = str(out / "eval.json")
    return EvalResult(results)


def sample_job_for(req: EvalRequest, num_classes: int) -> SampleJob:
    classes = req.classes if req.classes is not None else list(range(num_classes))
    num = req.num if req.num is not None else FID_IMAGES_PER_CLASS * len(classes)
    sample_job = SampleJob.evenly(classes, num, seed=req.seed, batch_size=req.batch_size, opts=req.opts)
    sample_job.validate(num_classes)
    return sample_job


def _fidelity_part(req: EvalRequest, loaded: Loaded, out: Path, *, policy, state, runtime: Runtime, progress):
    """Sample (sharded over processes) into ``out/samples``, then score on the main process."""
    sample_job = sample_job_for(req, loaded.model.num_classes)
    samples = out / "samples"
    record = job_record(sample_job, loaded.model_id, loaded.vae_id, policy, runtime.dtype)
    with claimed_folder(samples, record, overwrite=req.overwrite, main=state.is_main_process):
        state.wait_for_everyone()
        run_sample_job(
            loaded.model,
            loaded.vae,
            sample_job,
            samples,
            runtime=runtime,
            policy=policy,
            progress=progress if state.is_main_process else None,
            rank=state.process_index,
            world=state.num_processes,
        )
        state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    _, npz = finish_outputs(sample_job, samples, npz=True, grid=True)
    results: dict[str, Any] = {
        "sampling": {
            "images": sample_job.total,
            "processes": state.num_processes,
            "seed": req.seed,
            **req.opts.__dict__,
        },
        "samples_npz": str(npz),
    }
    scores = fidelity(
        npz,
        req.ref or SHAPES_REF,
        fid=req.fid,
        isc=req.isc,
        prc=req.prc,
        weights=req.inception_weights,
        device=runtime.device,
        labels=sample_job.labels,
    )
    return results | scores
