"""Pictures of comparisons: quality against measured time and against FLOPs, Pareto front marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_with


def _pyplot():
    """matplotlib's pyplot without a display (imported here only: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better on both)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def short_name(method: str) -> str:
    """A point's label: ``actvar:runs/x/default-s2/model.safetensors`` -> ``actvar:default-s2``."""
    family, _, arg = method.partition(":")
    if not arg.endswith(".safetensors"):
        return method
    path = Path(arg)
    return f"{family}:{path.parent.name if path.stem == 'model' else path.stem}"


def compare_plot(rows: list[dict[str, Any]], path: str | Path, ref: str | None) -> Path:
    """Two panels: quality (FID with a reference, else KL to the dense model) against seconds per
    batch and against GFLOPs per image; the Pareto front of each panel drawn as a line."""
    plt = _pyplot()
    key, label = ("fid", "FID (lower is better)") if ref and all("fid" in r for r in rows) else ("kl", "KL to dense")
    quality = [r[key] for r in rows]
    axes_data = [
        ([r["seconds"] for r in rows], "seconds per batch (measured)"),
        ([r["flops"] / 1e9 for r in rows], "GFLOPs per image"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    for ax, (xs, xlabel) in zip(axes, axes_data):
        front = pareto_front(list(zip(xs, quality)))
        ax.plot(
            [xs[i] for i in front],
            [quality[i] for i in front],
            "-",
            color="tab:green",
            lw=2,
            zorder=1,
            label="Pareto front",
        )
        for i, r in enumerate(rows):
            on_front = i in front
            ax.scatter(
                xs[i],
                quality[i],
                s=60 if on_front else 35,
                zorder=2,
                color="tab:green" if on_front else ("black" if r["method"] == "dense" else "tab:blue"),
            )
            ax.annotate(
                short_name(r["method"]), (xs[i], quality[i]), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"methods on one yardstick ({label.split(' (')[0]} against time and FLOPs)")
    path = Path(path)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def scale_plot(points: list[dict[str, Any]], path: str | Path) -> Path:
    """One panel per benchmark point timed by scale: each scale's step, dense and ActVAR, beside the
    time the ActVAR step would take at its FLOPs ratio; the gap between the last two is the loss."""
    plt = _pyplot()
    cols = min(2, len(points))
    rows_n = -(-len(points) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 4 * rows_n), constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(points) :]:
        ax.set_visible(False)
    for ax, p in zip(axes.flat, points):
        rows = p["by_scale"]["scales"]
        x = np.arange(len(rows))
        dense = [r["dense_s"] * 1e3 for r in rows]
        ideal = [r["dense_s"] * 1e3 / r["flops_ratio"] if r["flops_ratio"] else 0.0 for r in rows]
        ax.bar(x - 0.27, dense, 0.27, color="0.6", label="dense")
        ax.bar(x, [r["sparse_s"] * 1e3 for r in rows], 0.27, color="tab:blue", label="ActVAR")
        ax.bar(x + 0.27, ideal, 0.27, color="tab:green", alpha=0.5, label="ActVAR at its FLOPs ratio")
        ax.set_xticks(x, [f"{r['scale']}\n{r['tokens']}" for r in rows], fontsize=8)
        ax.set_xlabel("scale / tokens per image")
        ax.set_ylabel("ms per step")
        ax.set_title(
            f"{p['arch']}, batch {p['batch_size']}: {p['speedup']:.2f}x of {p['ideal_speedup']:.2f}x ideal, "
            f"bound {p['by_scale']['bound_speedup']:.2f}x",
            fontsize=9,
        )
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    path = Path(path)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def tune_plot(
    points: list[dict[str, Any]], path: str | Path, *, cap: float, dense_fid: float, chosen: str | None
) -> Path:
    """Measured speedup against FID of every fully evaluated stack: the cap, the front, the choice.
    Only the front and the choice are named (the others crowd; the report lists them all), and FID
    is on a log axis when it spans more than a factor of 5."""
    plt = _pyplot()
    done = [p for p in points if p.get("fid") is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    xs, ys = [p["fid"] for p in done], [p["speedup"] for p in done]
    front = pareto_front([(x, -y) for x, y in zip(xs, ys)])
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:green", lw=2, label="front")
    ax.scatter(xs, ys, s=30, color="tab:blue", zorder=2)
    ax.scatter([dense_fid], [1.0], s=60, color="black", zorder=3, label="dense")
    for i, (p, x, y) in enumerate(zip(done, xs, ys)):
        if i in front or p["stack"] == chosen:  # neighbours on the front alternate: right below, left above
            right = front.index(i) % 2 == 0 if i in front else True
            ax.annotate(p["stack"], (x, y), textcoords="offset points", xytext=(4, -9) if right else (-4, 4),
                        ha="left" if right else "right", fontsize=7)  # fmt: skip
        if p["stack"] == chosen:
            ax.scatter([x], [y], s=220, marker="*", color="tab:red", zorder=4, label="chosen")
    ax.axvline(cap, color="tab:red", ls="--", lw=1, label=f"cap (FID {cap:.2f})")
    if xs and max(xs + [dense_fid]) > 5 * min(xs + [dense_fid]):
        ax.set_xscale("log")
    ax.set_xlabel("FID (lower is better)")
    ax.set_ylabel("measured speedup over dense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("actvar tune: every fully evaluated stack")
    path = Path(path)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
