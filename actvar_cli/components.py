"""Named ranges around each component of generation, which a profiler can sum.

``component("attention")`` costs nothing unless a profiler listens; ``measure.profiling``
runs one and adds up the time spent inside each name.
"""

from __future__ import annotations

import torch

COMPONENTS = ("attention", "ffn", "select", "head", "decode")
PREFIX = "actvar::"


def component(name: str):
    return torch.profiler.record_function(PREFIX + name)
