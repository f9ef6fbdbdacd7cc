"""``tune``: find the cheapest stack of methods that keeps quality within a cap.

Every stack of the search space is first ranked on a cheap signal: its gain (the speedup its FLOPs
promise, times the speedup its quantization part measured alone; for ``--objective flops`` the FLOPs
saved), and how far its images drift from the dense model's in the yardstick's feature space (the
same seeds, a few dozen images). Single timings on a shared CPU swing by a third from one second to
the next, so the signal does not time each stack. Only the promising ones, the points no other point
beats on both, get the full yardstick: FID and
class accuracy on ``num`` samples and the speedup measured as ``bench`` measures it (interleaved runs
against the dense model, median of run-by-run ratios). The front is walked like a bisection from its
cheapest end, so that the cap's boundary is found in a few full evaluations, and what budget is left
goes to the boundary's neighbours. Every evaluated point is cached (JSON, keyed by base model, stack,
seed and sample count), so an interrupted search picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..files import atomic_write_text
from ..generation.jobs import generate_images
from ..progress import Progress
from ..runtime import Runtime
from ..sparsity.flops import count_flops
from ..sparsity.stacks import QUANT_PARTS, Stack, parse_stack, stack_policy
from .compare import agreement, experts_per_token
from .fidelity import ArraySet, extract, fidelity, yardstick_for
from .plots import pareto_front
from .timing import one_run, paired_speedup

# cfg-sharp keeps guidance's sharpening for the same work as cfg-off, which measured worse at every N
GUIDANCE = ("", "cfg-sharp:1", "cfg-sharp:2", "cfg-sharp:3", "cfg-sharp:4")
TOKENS = (
    "",
    "fixed-tokens:0.75+skipped-kv",
    "fixed-tokens:0.5+skipped-kv",
    "fixed-tokens:0.5+skipped-kv+skipped-update",  # the same FLOPs; skipped tokens get the previous update
    "fastvar:0.25",
    "fastvar:0.5",
)
EXPERTS = ("", "dmoe:0.5", "static-experts:0.75")
WEIGHTS = ("", "w8a8")
SKIPS = ("", "skip-last:1", "skip-last:2")


@dataclass
class TuneSettings:
    ref: str  # the yardstick: shapes, a folder or an ADM .npz
    max_fid_ratio: float = 1.5  # the cap: FID at most this many times the dense model's
    objective: str = "speedup"  # speedup (measured) or flops (saved)
    num: int = 200  # samples per fully evaluated point
    signal_images: int = 32  # images per point for the cheap signal
    batch_size: int = 8  # images per timed generation
    repeats: int = 5  # timed runs per point, interleaved with the dense model's
    seed: int = 0
    max_evals: int = 12  # fully evaluated points (the dense model not counted)
    time_limit_s: float = 15 * 60
    inception_weights: str | None = None

    def validate(self) -> None:
        if not 1 <= self.max_fid_ratio < math.inf:
            raise ConfigError(f"--max-fid-ratio {self.max_fid_ratio}: must be a number, 1 or more", "e.g. 1.5")
        if self.objective not in ("speedup", "flops"):
            raise ConfigError(f"--objective {self.objective!r}", "use speedup or flops")
        if self.num < 2:
            raise ConfigError(f"--num {self.num}: must be at least 2", "FID needs two samples or more")
        for name, value in (
            ("--max-evals", self.max_evals),
            ("--repeats", self.repeats),
            ("--batch-size", self.batch_size),
        ):
            if value < 1:
                raise ConfigError(f"{name} {value}: must be at least 1")
        if not self.time_limit_s > 0:
            raise ConfigError("--time-limit must be more than 0 minutes")


@dataclass
class Point:
    """One stack: the cheap signal for all, the full yardstick for the promising ones."""

    stack: str
    flops_savings: float
    drift: float  # mean squared feature distance to the dense images, over the dense features' variance
    kl: float  # KL(dense || stack) of the guided distributions, forced onto the dense tokens
    estimate: float = 1.0  # the signal's speedup: 1 / (1 - FLOPs saved), times the quantization's measured one
    fid: float | None = None
    class_accuracy: float | None = None
    speedup: float | None = None

    @property
    def evaluated(self) -> bool:
        return self.fid is not None


@dataclass
class TuneReport:
    dense_fid: float
    dense_class_accuracy: float | None
    cap: float  # the FID a point may not exceed
    points: list[Point]
    front: list[str] = field(default_factory=list)  # stacks on the front of measured speedup against FID
    chosen: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "points": [asdict(p) for p in self.points]}


class TuneCache:
    """Evaluated points as JSON files, keyed by base model, stack (with the sha256 of each model file
    it names), seed, sample count and measure."""

    def __init__(self, folder: Path, base_id: str, file_ids: dict[str, str] | None = None):
        self.folder, self.base_id, self.file_ids = Path(folder), base_id, dict(file_ids or {})

    def _path(self, kind: str, stack: str, settings: TuneSettings) -> Path:
        files = sorted(sha for path, sha in self.file_ids.items() if f"actvar:{path}" in stack)
        key = [self.base_id, kind, stack, *files, settings.seed, settings.ref]
        key += [settings.signal_images] if kind == "signal" else [settings.num, settings.batch_size, settings.repeats]
        return self.folder / f"{kind}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]}.json"

    def get(self, kind: str, stack: str, settings: TuneSettings) -> dict | None:
        path = self._path(kind, stack, settings)
        try:
            return json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            return None  # a damaged entry is measured again

    def put(self, kind: str, stack: str, settings: TuneSettings, value: dict) -> None:
        atomic_write_text(self._path(kind, stack, settings), json.dumps(value))


def search_space(num_scales: int, candidates: list[str]) -> list[str]:
    """Every stack of one guidance part, one token rule, one expert rule, a quantization and scale
    skipping, plus each candidate model alone and with guidance and quantization parts. Skipping goes
    only with guidance and quantization (a token or expert rule acts on the scales it would skip), and
    guidance only where it still runs."""
    stacks = []
    for g in GUIDANCE:
        for w in WEIGHTS:
            for t in TOKENS:
                for e in EXPERTS:
                    for s in SKIPS:
                        spec = "+".join(p for p in (t, e, g, w, s) if p)
                        if spec and _worth_searching(spec, num_scales):
                            stacks.append(spec)
            stacks += ["+".join(p for p in (f"actvar:{c}", g, w) if p) for c in candidates]
    return stacks


def _float_sibling(stack: Stack) -> str:
    """The stack without its quantization part (``dense`` for a quantization alone)."""
    return "+".join(f"{f}:{a}" if a else f for f, a in stack.parts if f not in QUANT_PARTS) or "dense"


def _names_a_candidate(stack: str) -> bool:
    """A model the user named, alone or quantized (with no part that changes what it draws)."""
    return stack.startswith("actvar:") and "+" not in _float_sibling(parse_stack(stack))


def _worth_searching(spec: str, num_scales: int) -> bool:
    """A stack that holds, and whose guidance part does not act only on skipped scales (that stack
    is the skip alone)."""
    try:
        policy = stack_policy(parse_stack(spec), num_scales)
    except ConfigError:
        return False
    return policy is None or not (policy.skip_last and 0 < policy.guidance_off <= policy.skip_last)


@dataclass
class Tuner:
    """What a search needs: a way to build each stack, the dense reference, and how to measure."""

    build: Callable[[str], Any]  # stack -> Method
    dense: Any  # the dense Method
    vae: Any
    settings: TuneSettings
    runtime: Runtime
    cache: TuneCache
    progress: Progress | None = None
    started: float = field(default_factory=time.perf_counter)

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.started > self.settings.time_limit_s

    # -- the dense reference -----------------------------------------------------------------

    def reference(self) -> dict[str, Any]:
        """The dense model's signal images and their features, and its FID on ``num`` samples."""
        s = self.settings
        labels = [i % self.dense.model.num_classes for i in range(s.signal_images)]
        images = generate_images(
            self.dense.model, self.vae, labels, seed=s.seed, batch_size=s.batch_size, runtime=self.runtime
        )
        feats = self._features(images)
        quality = self.cache.get("quality", "dense", s) or self._quality(self.dense)
        self.cache.put("quality", "dense", s, quality)
        return {"labels": labels, "features": feats, "variance": float(feats.var(0).sum()), **quality}

    def quantized_speedup(self, part: str) -> float:
        """What a quantization part alone gains, measured as ``full`` measures it (once per search)."""
        cached = self.cache.get("speed", part, self.settings)
        if cached is None:
            cached = {"speedup": self._speedup(self.build(part))}
            self.cache.put("speed", part, self.settings, cached)
        return cached["speedup"]

    def _features(self, images_NHWC: np.ndarray) -> np.ndarray:
        ys = yardstick_for(self.settings.ref, self.settings.inception_weights)
        return extract(ArraySet(images_NHWC), ys, self.runtime.device)[ys.fid_layer]

    def _quality(self, method) -> dict[str, Any]:
        s = self.settings
        labels = [i % method.model.num_classes for i in range(s.num)]
        images = generate_images(
            method.model, self.vae, labels, seed=s.seed, batch_size=s.batch_size, runtime=self.runtime,
            policy=method.policy,
        )  # fmt: skip
        scores = fidelity(
            ArraySet(images), s.ref, weights=s.inception_weights, device=self.runtime.device, labels=labels
        )
        return {"fid": scores["fid"], "class_accuracy": scores.get("class_accuracy")}

    # -- the cheap signal and the full yardstick ----------------------------------------------

    def signal(self, stack: str, ref: dict[str, Any]) -> Point:
        """FLOPs saved, drift and KL. A quantized stack takes the drift of the same stack in float:
        rounding every weight changes a token here and there from the first scale on, and a seed's
        images then go other ways however little the distribution moves (w8a8 on tiny: KL 0.002 to
        dense, yet as much drift as pruning a quarter of the tokens). Its KL is its own."""
        s = self.settings
        parts = parse_stack(stack)
        estimate = self.quantized_speedup(parts.quantization) if parts.quantization else 1.0
        cached = self.cache.get("signal", stack, s)
        if cached is None:
            m = self.build(stack)
            drift = self.signal(_float_sibling(parts), ref).drift if parts.quantization else self._drift(m, ref)
            agree = agreement(m, self.dense, self.vae, n=min(8, s.signal_images), seed=s.seed, runtime=self.runtime)
            per_token = experts_per_token(m, agree.pop("pairs_run"), min(8, s.signal_images)) if m.policy else None
            cfg = m.model.cfg
            savings = count_flops(cfg.replace(num_experts=0), m.policy, cfg.num_experts or 16, per_token).savings
            cached = {"flops_savings": savings, "drift": drift, "kl": agree["kl"]}
            self.cache.put("signal", stack, s, cached)
        return Point(stack, **cached, estimate=estimate / (1 - cached["flops_savings"]))

    def _drift(self, method, ref: dict[str, Any]) -> float:
        s = self.settings
        images = generate_images(
            method.model, self.vae, ref["labels"], seed=s.seed, batch_size=s.batch_size, runtime=self.runtime,
            policy=method.policy,
        )  # fmt: skip
        return float(((self._features(images) - ref["features"]) ** 2).sum(1).mean() / ref["variance"])

    def full(self, point: Point) -> Point:
        s = self.settings
        cached = self.cache.get("full", point.stack, s)
        if cached is None:
            m = self.build(point.stack)
            cached = {**self._quality(m), "speedup": self._speedup(m)}
            self.cache.put("full", point.stack, s, cached)
        point.fid, point.class_accuracy, point.speedup = cached["fid"], cached["class_accuracy"], cached["speedup"]
        return point

    def _speedup(self, method) -> float:
        """As ``bench`` measures it: one warm-up each, then dense and the stack in turn."""
        s = self.settings
        labels = torch.tensor([i % method.model.num_classes for i in range(s.batch_size)], device=self.runtime.device)
        runs: dict[str, list[float]] = {"dense": [], "stack": []}
        with torch.inference_mode():
            for r in range(s.repeats + 1):
                for name, m in (("dense", self.dense), ("stack", method)):
                    t, _, _ = one_run(m.model, self.vae, labels, seed=s.seed, policy=m.policy, runtime=self.runtime,
                                      decode=False)  # fmt: skip
                    if r:
                        runs[name].append(t)
        return paired_speedup(runs["dense"], runs["stack"])

    # -- the search -------------------------------------------------------------------------

    def search(self, stacks: list[str]) -> TuneReport:
        ref = self.reference()
        cap = self.settings.max_fid_ratio * ref["fid"]
        points = []
        for i, stack in enumerate(stacks):
            if self.out_of_time():
                break
            try:
                points.append(self.signal(stack, ref))
            except ConfigError:  # a part that this candidate model refuses (cfg-sharp on a guidance-distilled one)
                if "actvar:" not in stack:
                    raise
            self._tick("cheap signal", i + 1, len(stacks))
        for k, point in enumerate(self._order(points, cap)):
            if k >= self.settings.max_evals or self.out_of_time():
                break
            self.full(point)
            self._tick("full yardstick", k + 1, min(self.settings.max_evals, len(points)))
        report = TuneReport(ref["fid"], ref["class_accuracy"], cap, points)
        report.front, report.chosen = self._front(points), self._choose(points, cap)
        report.seconds = time.perf_counter() - self.started
        return report

    def _order(self, points: list[Point], cap: float):
        """The promising points in the order they are fully evaluated: the front of the signal's gain
        against drift, bisected from its cheapest end to find where the cap falls, then that end itself
        (the front's fast end, which the cap rarely admits), the boundary's neighbours, the rest of the
        front and the next layer. The models the user named (``--candidates``) come first, alone and
        quantized: the cheap signal measures drift from the dense images, and a model trained to draw
        other images (guidance distillation) would never be reached."""
        named = [p for p in points if _names_a_candidate(p.stack)]
        yield from sorted(named, key=lambda p: "+" in p.stack)  # each alone, then quantized
        front = self._signal_front(points)  # cheapest (the most gain) first
        rest = self._signal_front([p for p in points if p not in front])
        lo, hi = 0, len(front) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            yield self.full(front[mid])
            if front[mid].fid <= cap:
                hi = mid - 1  # it holds: look at cheaper points
            else:
                lo = mid + 1
        if front and not front[0].evaluated:
            yield front[0]
        near = sorted(front + rest, key=lambda p: abs(front.index(p) - lo) if p in front else len(front))
        yield from (p for p in near if not p.evaluated)

    def _front(self, points: list[Point]) -> list[str]:
        done = [p for p in points if p.evaluated]
        idx = pareto_front([(-self._gain(p), p.fid) for p in done])
        return [done[i].stack for i in idx]

    def _choose(self, points: list[Point], cap: float) -> str | None:
        held = [p for p in points if p.evaluated and p.fid <= cap]
        return max(held, key=self._gain).stack if held else None

    def _gain(self, p: Point) -> float:
        return p.speedup if self.settings.objective == "speedup" else p.flops_savings

    def _signal_front(self, points: list[Point]) -> list[Point]:
        """Points that no other beats on both the signal's gain and drift, the most gain first."""
        speed = self.settings.objective == "speedup"
        idx = pareto_front([(-(p.estimate if speed else p.flops_savings), p.drift) for p in points])
        return [points[i] for i in idx]

    def _tick(self, what: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(what, done, total)
