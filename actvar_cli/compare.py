"""``compare``: every method on one yardstick: the same model, classes, seeds, FLOPs counter and clock.

For each method: FLOPs saved (the analytic count, checked against torch's flop counter in the
tests), measured speedup (interleaved runs, as ``bench`` times them), peak memory, agreement
with the dense model (the method generates while forced onto the dense model's tokens, so
both predict each scale from the same inputs: token agreement and KL of the guided
distributions), and with ``ref`` FID, IS and class accuracy of ``num`` samples.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bench import PeakMemory, paired_speedup
from .device import autocast, synchronize
from .fidelity import ArraySet, check_reference, fidelity, yardstick_for
from .flops import count_flops
from .method_specs import method_policy, parse_method
from .methods import Method, MethodBuilder
from .progress import Progress
from .sample_job import generate_images
from .sampling import SamplingOptions, generate, image_generators
from .sparse import GenerationState


@dataclass
class CompareJob:
    base: str
    methods: list[str]
    vae: str | None = None
    ref: str | None = None  # quality metrics against it (e.g. shapes)
    num: int = 64  # samples per method for the quality metrics
    agreement_images: int = 16  # dense pyramids the methods are forced onto
    batch_size: int = 8  # images per timed generation
    repeats: int = 3
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    inception_weights: str | None = None
    plot: Path | None = None
    opts: SamplingOptions = field(default_factory=SamplingOptions)

    def validate(self) -> None:
        from .errors import ConfigError

        for name, value, least in (
            ("--num", self.num, 1),
            ("--batch-size", self.batch_size, 1),
            ("--repeats", self.repeats, 1),
            ("--agreement-images", self.agreement_images, 1),
        ):
            if value < least:
                raise ConfigError(f"{name} {value}: must be at least {least}")
        if self.plot is not None and Path(self.plot).suffix.lower() != ".png":
            raise ConfigError(f"--plot {self.plot}: the plot is a .png file")
        self.opts.validate()
        if self.ref:
            check_reference(self.ref)
            yardstick_for(self.ref, self.inception_weights)


def _generate(m: Method, vae, labels, seed, ids, device, dtype, **kw):
    with autocast(device, dtype):
        return generate(m.model, vae, labels, rng=image_generators(seed, ids, device), policy=m.policy, **kw)


@torch.no_grad()
def agreement(m: Method, dense: Method, vae, n: int, seed: int, device, dtype) -> dict[str, Any]:
    """The method forced onto the dense model's token pyramids: per generated scale, how often its
    most likely token is the dense one's and KL(dense || method) of the guided distributions;
    also the mean number of experts each kept token ran (the threshold rule's FLOPs)."""
    S = len(dense.model.cfg.patch_nums)
    agree, kl, pairs = np.zeros(S), np.zeros(S), {}
    for s in range(0, n, 8):
        ids = list(range(s, min(n, s + 8)))
        labels = torch.tensor([i % dense.model.num_classes for i in ids], device=device)
        ref = _generate(dense, vae, labels, seed, ids, device, dtype, keep_logits=True)
        state = GenerationState(
            record_sublayers=m.policy is not None and m.policy.token_rule == "far-from-mean", count_pairs=True
        )
        out = _generate(m, vae, labels, seed, ids, device, dtype, keep_logits=True, forced=ref.tokens, state=state)
        for si, (p, q) in enumerate(zip(ref.guided, out.guided)):
            lp, lq = p.log_softmax(-1), q.log_softmax(-1)
            agree[si] += (p.argmax(-1) == q.argmax(-1)).float().mean(1).sum().item()
            kl[si] += (lp.exp() * (lp - lq)).sum(-1).mean(1).sum().item()
        for si, k in state.pairs_run.items():
            pairs[si] = pairs.get(si, 0) + k
    generated = len(out.guided)
    agree, kl = agree[:generated] / n, kl[:generated] / n
    return {
        "token_agreement": float(agree.mean()),
        "kl": float(kl.mean()),
        "scales_generated": generated,
        "per_scale_agreement": agree.tolist(),
        "per_scale_kl": kl.tolist(),
        "pairs_run": pairs,
    }


def experts_per_token(m: Method, pairs: dict[int, int], images: int) -> dict[int, float]:
    """Mean experts per kept token at each scale, from the pairs a run counted."""
    cfg, out = m.model.cfg, {}
    for si, k in pairs.items():
        plan = m.policy.plan(si, cfg.patch_nums, cfg.num_experts)
        out[si] = k / (cfg.depth * (2 if plan.guided else 1) * plan.keep_tokens * images)
    return out


def timing(methods: list[Method], vae, job: CompareJob, device, dtype, progress: Progress | None) -> dict[str, dict]:
    """Median generation time of one batch per method, runs interleaved so that drift hits all alike."""
    labels = torch.tensor([i % methods[0].model.num_classes for i in range(job.batch_size)], device=device)
    ids = list(range(job.batch_size))
    runs: dict[str, list[float]] = {m.name: [] for m in methods}
    peak: dict[str, int] = dict.fromkeys(runs, 0)
    total, done = (job.repeats + 1) * len(methods), 0
    with torch.inference_mode():
        for r in range(job.repeats + 1):  # the first round warms up
            for m in methods:
                with PeakMemory(device) as mem:
                    synchronize(device)
                    t0 = time.perf_counter()
                    _generate(m, vae, labels, job.seed, ids, device, dtype)
                    synchronize(device)
                    elapsed = time.perf_counter() - t0
                if r:
                    runs[m.name].append(elapsed)
                    peak[m.name] = max(peak[m.name], mem.peak)
                done += 1
                if progress:
                    progress("timing", done, total)
    return {
        name: {"seconds": statistics.median(t), "runs": t, "peak_memory_mb": peak[name] / 2**20}
        for name, t in runs.items()
    }


def quality(m: Method, vae, job: CompareJob, device, dtype) -> dict[str, Any]:
    num_classes = m.model.num_classes
    labels = [i % num_classes for i in range(job.num)]
    imgs = generate_images(m.model, vae, labels, job.seed, job.batch_size, device, dtype, m.policy, job.opts)
    scores = fidelity(
        ArraySet(imgs), job.ref, fid=True, isc=True, weights=job.inception_weights, device=device, labels=labels
    )
    return {k: v for k, v in scores.items() if k in ("fid", "inception_score", "class_accuracy")}


def run_compare(job: CompareJob, progress: Progress | None = None) -> dict[str, Any]:
    from .checkpoint import check_pair, load_vae, load_var
    from .device import pick_device, resolve_dtype
    from .hub import check_base_hash, find_vae

    job.validate()
    device = pick_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    dense_model, info = load_var(job.base)
    vae, _ = load_vae(find_vae(info.metadata, job.vae), dense_model.cfg.patch_nums)
    check_pair(dense_model.cfg, vae)

    def load_actvar(path: str):
        model, actvar_info = load_var(path)
        if model.cfg.replace(num_experts=0) != dense_model.cfg:
            from .errors import ConfigError

            raise ConfigError(f"{path} was not made from {job.base} (another architecture)")
        if info.format != "builtin":
            check_base_hash(job.base, actvar_info.metadata.get("base_sha256", ""))
        return model.to(device)

    builder = MethodBuilder(
        lambda: load_var(job.base)[0].to(device), vae.to(device), seed=job.seed, load_actvar=load_actvar
    )
    specs = ["dense"] + [s for s in job.methods if s.strip() != "dense"]
    for spec in specs:  # every name and parameter checked before any work
        family, arg = parse_method(spec)
        if family != "dense":
            method_policy(family, arg, len(dense_model.cfg.patch_nums))
    methods = []
    for i, spec in enumerate(specs):
        methods.append(builder.build(spec))
        if progress:
            progress("building methods", i + 1, len(specs))
    return _measure_all(methods, vae, job, device, dtype, progress)


def _measure_all(methods: list[Method], vae, job: CompareJob, device, dtype, progress) -> dict[str, Any]:
    dense = methods[0]
    times = timing(methods, vae, job, device, dtype, progress)
    rows = []
    for i, m in enumerate(methods):
        agree = agreement(m, dense, vae, job.agreement_images, job.seed, device, dtype)
        cfg = m.model.cfg
        per_token = experts_per_token(m, agree.pop("pairs_run"), job.agreement_images) if m.policy else None
        flops = count_flops(cfg.replace(num_experts=0), m.policy, cfg.num_experts or 16, per_token)
        row = {
            "method": m.name,
            "description": m.description,
            "policy": m.policy.to_dict() if m.policy else None,
            "flops": flops.sparse_flops,
            "flops_savings": flops.savings,
            "seconds": times[m.name]["seconds"],
            "speedup": paired_speedup(times[dense.name]["runs"], times[m.name]["runs"]),
            "peak_memory_mb": times[m.name]["peak_memory_mb"],
            **agree,
        }
        if job.ref:
            row.update(quality(m, vae, job, device, dtype))
        rows.append(row)
        if progress:
            progress("measuring", i + 1, len(methods))
    result = {
        "base": job.base,
        "device": str(device),
        "dtype": dtype,
        "batch_size": job.batch_size,
        "repeats": job.repeats,
        "num": job.num if job.ref else 0,
        "ref": job.ref,
        "methods": rows,
    }
    if job.plot is not None:
        from .plots import compare_plot

        result["plot"] = str(compare_plot(rows, job.plot, job.ref))
    return result
