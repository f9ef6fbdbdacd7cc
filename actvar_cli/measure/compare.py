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
from typing import Any

import numpy as np
import torch

from ..convert.method_models import Method
from ..errors import ConfigError
from ..generation.jobs import generate_images
from ..generation.sampling import SamplingOptions, generate, image_generators
from ..progress import Progress
from ..runtime import Runtime
from ..sparsity.blocks import GenerationState
from ..sparsity.flops import count_flops
from .fidelity import ArraySet, check_reference, fidelity, yardstick_for
from .timing import PeakMemory, paired_speedup


@dataclass
class CompareSettings:
    """How every method is measured: the same samples, seeds, timing batch and reference."""

    ref: str | None = None  # quality metrics against it (e.g. shapes)
    num: int = 64  # samples per method for the quality metrics
    agreement_images: int = 16  # dense pyramids the methods are forced onto
    batch_size: int = 8  # images per timed generation
    repeats: int = 3
    seed: int = 0
    inception_weights: str | None = None
    opts: SamplingOptions = field(default_factory=SamplingOptions)

    def validate(self) -> None:
        for name, value in (
            ("--num", self.num),
            ("--batch-size", self.batch_size),
            ("--repeats", self.repeats),
            ("--agreement-images", self.agreement_images),
        ):
            if value < 1:
                raise ConfigError(f"{name} {value}: must be at least 1")
        self.opts.validate()
        if self.ref:
            check_reference(self.ref)
            yardstick_for(self.ref, self.inception_weights)


def _generate(m: Method, vae, labels, *, seed: int, ids: list[int], runtime: Runtime, **kw):
    rng = image_generators(seed, ids, runtime.device)
    with runtime.autocast():
        return generate(m.model, vae, labels, rng=rng, policy=m.policy, **kw)


@torch.no_grad()
def agreement(m: Method, dense: Method, vae, *, n: int, seed: int, runtime: Runtime) -> dict[str, Any]:
    """The method forced onto the dense model's token pyramids: per generated scale, how often its
    most likely token is the dense one's and KL(dense || method) of the guided distributions;
    also the mean number of experts each kept token ran (the threshold rule's FLOPs)."""
    S = len(dense.model.cfg.patch_nums)
    agree, kl, pairs = np.zeros(S), np.zeros(S), {}
    for s in range(0, n, 8):
        ids = list(range(s, min(n, s + 8)))
        labels = torch.tensor([i % dense.model.num_classes for i in ids], device=runtime.device)
        ref = _generate(dense, vae, labels, seed=seed, ids=ids, runtime=runtime, keep_logits=True)
        state = GenerationState(
            record_sublayers=m.policy is not None and m.policy.token_rule == "far-from-mean", count_pairs=True
        )
        out = _generate(
            m, vae, labels, seed=seed, ids=ids, runtime=runtime, keep_logits=True, forced=ref.tokens, state=state
        )
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


def timing(
    methods: list[Method], vae, settings: CompareSettings, *, runtime: Runtime, progress: Progress | None = None
) -> dict[str, dict]:
    """Median generation time of one batch per method, runs interleaved so that drift hits all alike."""
    labels = torch.tensor([i % methods[0].model.num_classes for i in range(settings.batch_size)], device=runtime.device)
    ids = list(range(settings.batch_size))
    runs: dict[str, list[float]] = {m.name: [] for m in methods}
    peak: dict[str, int] = dict.fromkeys(runs, 0)
    total, done = (settings.repeats + 1) * len(methods), 0
    with torch.inference_mode():
        for r in range(settings.repeats + 1):  # the first round warms up
            for m in methods:
                with PeakMemory(runtime.device) as mem:
                    runtime.synchronize()
                    t0 = time.perf_counter()
                    _generate(m, vae, labels, seed=settings.seed, ids=ids, runtime=runtime)
                    runtime.synchronize()
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


def quality(m: Method, vae, settings: CompareSettings, *, runtime: Runtime) -> dict[str, Any]:
    """FID, IS and (on shapes) class accuracy of ``settings.num`` samples, classes in turn."""
    labels = [i % m.model.num_classes for i in range(settings.num)]
    imgs = generate_images(
        m.model,
        vae,
        labels,
        seed=settings.seed,
        batch_size=settings.batch_size,
        runtime=runtime,
        policy=m.policy,
        opts=settings.opts,
    )
    scores = fidelity(
        ArraySet(imgs),
        settings.ref,
        fid=True,
        isc=True,
        weights=settings.inception_weights,
        device=runtime.device,
        labels=labels,
    )
    return {k: v for k, v in scores.items() if k in ("fid", "inception_score", "class_accuracy")}


def measure_methods(
    methods: list[Method], vae, settings: CompareSettings, *, runtime: Runtime, progress: Progress | None = None
) -> list[dict[str, Any]]:
    """A row per method (the first is the dense reference): FLOPs, measured speed, memory,
    agreement with the dense model, and with a reference FID, IS and class accuracy."""
    dense = methods[0]
    times = timing(methods, vae, settings, runtime=runtime, progress=progress)
    rows = []
    for i, m in enumerate(methods):
        agree = agreement(m, dense, vae, n=settings.agreement_images, seed=settings.seed, runtime=runtime)
        cfg = m.model.cfg
        per_token = experts_per_token(m, agree.pop("pairs_run"), settings.agreement_images) if m.policy else None
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
        if settings.ref:
            row.update(quality(m, vae, settings, runtime=runtime))
        rows.append(row)
        if progress:
            progress("measuring", i + 1, len(methods))
    return rows
