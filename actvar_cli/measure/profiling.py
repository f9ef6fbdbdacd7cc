"""Where generation spends its time: the named component ranges, summed by a profiler.

``time_components`` runs a function under ``torch.profiler`` and returns the seconds spent in
each range that ``components.component`` marks (plus ``other``: everything outside them).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

from ..components import COMPONENTS, PREFIX
from ..runtime import Runtime


def time_components(fn: Callable[[], object], runtime: Runtime) -> dict[str, float]:
    """Seconds per component of one call of ``fn`` (wall time; ``other`` is the rest)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        runtime.synchronize()
        total = time.perf_counter() - t0
    spent = dict.fromkeys(COMPONENTS, 0.0)
    for ev in prof.events():
        if ev.name.startswith(PREFIX) and ev.name[len(PREFIX) :] in spent:
            spent[ev.name[len(PREFIX) :]] += ev.cpu_time_total / 1e6
    spent["other"] = max(0.0, total - sum(spent.values()))
    spent["total"] = total
    return spent
