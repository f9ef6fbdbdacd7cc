"""Markdown tables for docs/benchmarks.md from `actvar bench --json` outputs, with the goals marked.

Usage: python scripts/bench_table.py runs/bench/*.json  (sweeps and single points; a point with a
breakdown gets its component table, every point timed ``--by-scale`` its per-scale table);
add ``--plot PATH tiny:8,d16:4`` for the per-scale picture of those points.
"""

import json
import sys

GOALS = {  # (arch, batch) -> least share of the ideal gain (issue 11); every point must not be slower than dense
    ("d16", 4): 0.8,
    ("d16", 8): 0.8,
    ("d20", 4): 0.8,
    ("d20", 8): 0.8,
    ("d12", 4): 0.6,
    ("tiny", 8): 0.5,  # the reference model, at the demo's batch
}


def load_points(paths: list[str]) -> list[dict]:
    """Every point of every file: a sweep's ``points`` or a single result."""
    points = []
    for path in paths:
        r = json.load(open(path))
        points += r.get("points", [r])
    return points


def sweep(points: list[dict]) -> None:
    print("| model | batch | dense s | ActVAR s | speedup | ideal | share of the ideal gain | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for p in points:
        eff, key = p["efficiency"], (p["arch"], p["batch_size"])
        goals = ["not slower: " + ("met" if p["speedup"] >= 1 else "**not met**")]
        if key in GOALS:
            goals.append(f"≥{GOALS[key]:.0%} of ideal: " + ("met" if eff >= GOALS[key] else "**not met**"))
        print(
            f"| {p['arch']} | {p['batch_size']} | {p['dense']['generation_s']:.3f} | {p['sparse']['generation_s']:.3f} "
            f"| {p['speedup']:.3f}x | {p['ideal_speedup']:.3f}x | {eff:.0%} | {'; '.join(goals)} |"
        )


def by_scale(r: dict) -> None:
    b = r["by_scale"]
    print(f"\n{r['arch']}, batch {r['batch_size']}: each scale's step, medians of {r['repeats']} runs\n")
    print("| scale | tokens | dense ms | ActVAR ms | speedup | FLOPs ratio | share of dense FLOPs |")
    print("|---|---|---|---|---|---|---|")
    for x in b["scales"]:
        speed = f"{x['speedup']:.2f}x" if x["speedup"] else "skipped"
        print(
            f"| {x['scale']} | {x['tokens']} | {x['dense_s'] * 1e3:.1f} | {x['sparse_s'] * 1e3:.1f} | {speed} "
            f"| {x['flops_ratio']:.2f}x | {x['dense_flops_share']:.0%} |"
        )
    print(
        f"\nOutside the steps: {b['outside_steps_s'] * 1e3:.1f} ms. Every step at its FLOPs ratio would give "
        f"{b['bound_speedup']:.3f}x ({b['bound_efficiency']:.0%} of the ideal gain); measured {r['speedup']:.3f}x."
    )


def breakdown(r: dict) -> None:
    b = r["breakdown"]
    d, s = b["dense"], b["sparse"]
    print(f"\n{r['arch']}, batch {r['batch_size']}: one generation and decode\n")
    print(
        "| component | dense s | share of time | share of FLOPs | ActVAR s | share of time | share of FLOPs | speedup |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c in [*d["flops_share"], "total"]:
        ds, ss = d["seconds"][c], s["seconds"][c]
        fd = f"{d['flops_share'][c]:.0%}" if c in d["flops_share"] else ""
        fs = f"{s['flops_share'][c]:.0%}" if c in s["flops_share"] else ""
        print(
            f"| {c} | {ds:.3f} | {ds / d['seconds']['total']:.0%} | {fd} | {ss:.3f} | {ss / s['seconds']['total']:.0%} "
            f"| {fs} | {ds / ss:.2f}x |"
        )


def plot(points: list[dict], path: str, which: str) -> None:
    """The per-scale picture of the points named ``arch:batch,...`` (docs/benchmarks-scales.png)."""
    from actvar_cli.measure.plots import scale_plot

    chosen = [(a, int(b)) for a, b in (w.split(":") for w in which.split(","))]
    by_key = {(p["arch"], p["batch_size"]): p for p in points if "by_scale" in p}
    print(f"\nplot: {scale_plot([by_key[k] for k in chosen], path)}")


if __name__ == "__main__":
    args = sys.argv[1:]
    plot_args = None
    if "--plot" in args:  # --plot PATH ARCH:BATCH,...
        i = args.index("--plot")
        plot_args, args = args[i + 1 : i + 3], args[:i] + args[i + 3 :]
    points = load_points(args)
    sweep([p for p in points if "breakdown" not in p])
    for p in points:
        if "breakdown" in p:
            breakdown(p)
        if "by_scale" in p:
            by_scale(p)
    if plot_args:
        plot(points, *plot_args)
