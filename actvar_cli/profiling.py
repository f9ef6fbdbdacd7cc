"""Where generation spends its time: named ranges around each component, summed by a profiler.

``component("attention")`` marks a range; it costs nothing unless a profiler is listening.
``time_components`` runs a function under ``torch.profiler`` and returns the seconds spent in
each named component (plus ``other``: everything outside them).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

COMPONENTS = ("attention", "ffn", "select", "head", "decode")
PREFIX = "actvar::"


def component(name: str):
    return torch.profiler.record_function(PREFIX + name)


def time_components(fn: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Seconds per component of one call of ``fn`` (wall time; ``other`` is the rest)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - t0
    spent = dict.fromkeys(COMPONENTS, 0.0)
    for ev in prof.events():
        if ev.name.startswith(PREFIX) and ev.name[len(PREFIX) :] in spent:
            spent[ev.name[len(PREFIX) :]] += ev.cpu_time_total / 1e6
    spent["other"] = max(0.0, total - sum(spent.values()))
    spent["total"] = total
    return spent
