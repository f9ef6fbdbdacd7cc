"""How the command line shows results: every Rich table and progress bar, in one place.

The library returns plain dicts and dataclasses; these functions turn them into tables.
Only the CLI imports this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape as _escape_markup
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..progress import Progress as ProgressCallback

out = Console(emoji=False)  # results; no :name: emoji codes in what users and files wrote
err = Console(stderr=True, emoji=False)  # messages, progress
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # terminal escapes and other control characters


def escape(text: object) -> str:
    """Text from a user or a file, safe to print: no Rich markup, no terminal control sequences."""
    return _escape_markup(CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text)))


@contextmanager
def progress_bars(transient: bool = False) -> Iterator[ProgressCallback]:
    """A ``(what, done, total)`` callback that keeps one bar per ``what``."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
    )
    tasks: dict[str, Any] = {}

    def update(what: str, done: int, total: int, info: str = "") -> None:
        if not tasks:
            bar.start()  # only once there is work to show: a command refused at once prints one line
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total, info="")
        bar.update(tasks[what], completed=done, total=total, info=info)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def sample_summary(s: dict[str, Any]) -> None:
    out.print(
        f"[green]✓[/] {s['images']} images in {s['out_dir']} ({s['generated']} new, {s['skipped']} kept); "
        f"{s['images_per_s']:.2f} images/s on {s['device']} ({s['dtype']})",
        highlight=False,
    )


def kv_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=escape(title), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(escape(k), escape(v))
    return table


def columns(title: str, names: list[str], rows: list[list[str]], first_left: bool = False) -> Table:
    table = Table(title=escape(title), title_justify="left")
    for i, name in enumerate(names):
        table.add_column(escape(name), justify="left" if first_left and i == 0 else "right")
    for r in rows:
        table.add_row(*(escape(c) for c in r))
    return table


def inspect_report(report: dict[str, Any]) -> None:
    rows = {k: v for k, v in report.items() if k not in ("config", "metadata")}
    out.print(kv_table(f"{report['kind']} checkpoint", rows))
    out.print(kv_table("inferred config", report["config"]))
    if report.get("metadata"):
        out.print(kv_table("metadata", report["metadata"]))


def flops_report(data: dict[str, Any]) -> None:
    n_exp = data["num_experts"]
    rows = []
    for s in data["per_scale"]:
        saved = 1 - s["sparse_flops"] / s["dense_flops"]
        rows.append(
            [
                str(s["scale"]),
                str(s["tokens"]),
                str(s["kept_tokens"]),
                f"{s['kept_experts']}/{n_exp}",
                f"{s['dense_flops'] / 1e9:.2f}",
                f"{s['sparse_flops'] / 1e9:.2f}",
                f"{saved:.1%}" if saved else "",
            ]
        )
    table = columns(
        f"FLOPs per image (CFG), depth {data['arch']['depth']}, width {data['arch']['embed_dim']}",
        ["scale", "tokens", "kept", "experts", "dense GFLOPs", "ActVAR GFLOPs", "saved"],
        rows,
    )
    table.add_row(
        "all",
        "",
        "",
        "",
        f"{data['dense_flops'] / 1e9:.2f}",
        f"{data['sparse_flops'] / 1e9:.2f}",
        f"{data['savings']:.1%}",
        style="bold",
    )
    out.print(table)
    comp = data["components"]
    out.print(
        columns(
            "by component (GFLOPs)",
            ["component", "dense", "ActVAR"],
            [[c, f"{comp['dense'][c] / 1e9:.2f}", f"{comp['sparse'][c] / 1e9:.2f}"] for c in comp["dense"]],
        )
    )
    out.print(f"savings {data['savings']:.1%}; ideal speedup {data['ideal_speedup']:.3f}x", highlight=False)


def paper_table(rows: list[dict[str, Any]]) -> None:
    body = [
        [
            r["arch"],
            ",".join(map(str, r["scales"])),
            ",".join(f"{x:g}" for x in r["token_rates"]),
            f"{r['weight_rate']:g}",
            f"{r['paper_savings']:.1%}",
            f"{r['our_savings']:.1%}",
            f"{r['paper_eq12_savings']:.1%}",
        ]
        for r in rows
    ]
    out.print(
        columns(
            "FLOPs savings: ours vs the paper (one image, CFG)",
            ["model", "scales", "token rates", "weight rate", "paper", "ours", "paper eq. 12"],
            body,
        )
    )
    out.print("Why they differ: docs/flops.md", style="dim")


def bench_result(result: dict[str, Any]) -> None:
    if "points" in result:
        bench_sweep(result["points"])
    else:
        bench_point(result)
    if result.get("plot"):
        out.print(f"plot: {escape(result['plot'])}", highlight=False)


def bench_point(result: dict[str, Any]) -> None:
    rows = []
    for name in ("dense", "sparse"):
        r = result[name]
        rows.append(
            [
                name,
                f"{r['generation_s']:.3f}",
                f"{r['decode_s']:.3f}",
                f"{r['images_per_s']:.3f}",
                f"{r['images_per_s_end_to_end']:.3f}",
                f"{r['peak_memory_mb']:.0f}",
            ]
        )
    title = f"dense vs ActVAR on {result['device']} ({result['dtype']}), batch {result['batch_size']}"
    title += f", median of {result['repeats']}"
    out.print(columns(title, ["", "generation s", "decode s", "images/s", "images/s end-to-end", "peak MB"], rows))
    eff = result["efficiency"]
    out.print(
        f"speedup {result['speedup']:.3f}x (transformer), {result['speedup_end_to_end']:.3f}x end-to-end; "
        f"ideal {result['ideal_speedup']:.3f}x from FLOPs (savings {result['savings']:.1%})"
        + (f"; {eff:.0%} of the ideal gain" if eff is not None else ""),
        highlight=False,
    )
    if result.get("note"):
        out.print(escape(result["note"]), style="dim")
    if "breakdown" in result:
        bench_breakdown(result["breakdown"])
    if "by_scale" in result:
        bench_scales(result["by_scale"], result["ideal_speedup"])


def bench_scales(b: dict[str, Any], ideal: float) -> None:
    body = [
        [
            str(r["scale"]),
            str(r["tokens"]),
            f"{r['dense_s'] * 1e3:.1f}",
            f"{r['sparse_s'] * 1e3:.1f}",
            f"{r['speedup']:.2f}x" if r["speedup"] else "skipped",
            f"{r['flops_ratio']:.2f}x" if r["flops_ratio"] else "",
            f"{r['dense_flops_share']:.0%}",
        ]
        for r in b["scales"]
    ]
    names = ["scale", "tokens", "dense ms", "ActVAR ms", "speedup", "FLOPs ratio", "FLOPs share"]
    out.print(columns("time per scale (the transformer step, medians of the timed runs)", names, body))
    eff = b["bound_efficiency"]
    out.print(
        f"outside the steps (sampling, VQVAE update): {b['outside_steps_s'] * 1e3:.1f} ms per generation; "
        f"if every step ran at its FLOPs ratio: {b['bound_speedup']:.3f}x of the ideal {ideal:.3f}x"
        + (f" ({eff:.0%} of the ideal gain)" if eff is not None else ""),
        highlight=False,
    )


def bench_sweep(points: list[dict[str, Any]]) -> None:
    body = []
    for p in points:
        eff = p["efficiency"]
        body.append(
            [
                str(p["arch"]),
                str(p["batch_size"]),
                f"{p['dense']['generation_s']:.3f}",
                f"{p['sparse']['generation_s']:.3f}",
                f"{p['speedup']:.3f}x",
                f"{p['ideal_speedup']:.3f}x",
                f"{eff:.0%}" if eff is not None else "",
            ]
        )
    names = ["model", "batch", "dense s", "ActVAR s", "speedup", "ideal", "of ideal gain"]
    out.print(columns("measured vs ideal speedup", names, body))
    for p in points:
        if "breakdown" in p or "by_scale" in p:
            out.print(f"{escape(p['arch'])}, batch {p['batch_size']}:", style="bold")
        if "breakdown" in p:
            bench_breakdown(p["breakdown"])
        if "by_scale" in p:
            bench_scales(p["by_scale"], p["ideal_speedup"])


def bench_breakdown(b: dict[str, Any]) -> None:
    d, s = b["dense"], b["sparse"]
    body = []
    for c in (*d["flops_share"], "total"):
        ds, ss = d["seconds"][c], s["seconds"][c]
        share = (f"{d['flops_share'][c]:.0%}", f"{s['flops_share'][c]:.0%}") if c in d["flops_share"] else ("", "")
        body.append(
            [
                c,
                f"{ds:.3f}",
                f"{ds / d['seconds']['total']:.0%}",
                share[0],
                f"{ss:.3f}",
                f"{ss / s['seconds']['total']:.0%}",
                share[1],
                f"{ds / ss:.2f}x" if ss else "",
            ]
        )
    names = ["component", "dense s", "time", "FLOPs", "ActVAR s", "time", "FLOPs", "speedup"]
    out.print(columns("time per component (one generation and decode)", names, body, first_left=True))


METRIC_LABELS = {
    "fid": "FID",
    "inception_score": "Inception Score",
    "precision": "precision",
    "recall": "recall",
    "class_accuracy": "class accuracy",
    "token_agreement": "token agreement (sparse scales)",
    "logit_kl": "KL(teacher || model) (sparse scales)",
    "psnr_db": "PSNR vs teacher (dB)",
}


def eval_results(results: dict[str, Any]) -> None:
    rows = {"FLOPs saved": f"{results['flops']['savings']:.1%}"}
    rows.update({label: f"{results[key]:.4f}" for key, label in METRIC_LABELS.items() if key in results})
    out.print(kv_table(f"evaluation of {results['model']}", rows))
    if "per_scale" in results:
        body = [
            [
                str(r["scale"]),
                str(r["tokens"]),
                "yes" if r["sparse"] else "",
                f"{r['token_agreement']:.4f}",
                f"{r['logit_kl']:.4f}",
            ]
            for r in results["per_scale"]
        ]
        out.print(columns("per scale (teacher forcing)", ["scale", "tokens", "sparse", "token agreement", "KL"], body))
    out.print(f"results: {escape(results['eval_json'])}", highlight=False)


def distill_summary(summary: dict[str, Any], title: str) -> None:
    rows = {k: summary[k] for k in ("steps", "epochs", "global_batch", "num_processes", "grad_accum", "data")}
    rows.update(summary["final_losses"])
    rows["samples/s"] = round(summary["samples_per_s"], 2)
    out.print(kv_table(title, rows))


def demo_summary(summary: dict[str, Any]) -> None:
    m = summary["models"]
    body = [
        [name, f"{r['class_accuracy']:.1%}", f"{r['fid']:.2f}", f"{r['token_agreement']:.3f}", f"{r['logit_kl']:.4f}"]
        for name, r in m.items()
    ]
    out.print(
        columns(
            "actvar demo (built-in reference model)",
            ["model", "class accuracy", "FID (shapes)", "token agreement", "KL to dense"],
            body,
            first_left=True,
        )
    )
    out.print(
        f"FLOPs saved {summary['flops_savings']:.1%}; measured speedup {summary['measured_speedup']:.2f}x "
        f"(ideal {summary['ideal_speedup']:.2f}x)\nmodel: {escape(summary['model'])}\n"
        f"picture: {escape(summary['compare'])}",
        highlight=False,
    )


def compare_table(result: dict[str, Any]) -> None:
    quality = [k for k in ("fid", "inception_score", "class_accuracy") if any(k in r for r in result["methods"])]
    names = ["method", "FLOPs saved", "speedup", "peak MB", "token agreement", "KL to dense", *quality]
    body = []
    for r in result["methods"]:
        cells = [
            r["method"],
            f"{r['flops_savings']:.1%}",
            f"{r['speedup']:.2f}x",
            f"{r['peak_memory_mb']:.0f}",
            f"{r['token_agreement']:.3f}",
            f"{r['kl']:.4f}",
        ]
        cells += [f"{r[k]:.3f}" if k in r else "" for k in quality]
        body.append(cells)
    title = f"methods on {result['base']} ({result['device']}, {result['dtype']}, batch {result['batch_size']})"
    out.print(columns(title, names, body, first_left=True))
    if result.get("plot"):
        out.print(f"plot: {escape(result['plot'])}", highlight=False)


def tune_report(r: dict[str, Any]) -> None:
    points = sorted((p for p in r["points"] if p["fid"] is not None), key=lambda p: -p["speedup"])
    body = [
        [
            ("* " if p["stack"] == r["chosen"] else "") + p["stack"],
            f"{p['flops_savings']:.1%}",
            f"{p['speedup']:.2f}x",
            f"{p['estimate']:.2f}x",
            f"{p['fid']:.2f}",
            f"{p['fid'] / r['dense_fid']:.2f}",
            f"{p['class_accuracy']:.1%}" if p["class_accuracy"] is not None else "",
            f"{p['drift']:.3f}",
            "yes" if p["stack"] in r["front"] else "",
        ]
        for p in points
    ]
    names = ["stack", "FLOPs saved", "speedup", "estimate", "FID", "x dense", "class accuracy", "drift", "front"]
    title = f"actvar tune: {len(points)} of {len(r['points'])} stacks fully measured (dense FID {r['dense_fid']:.2f})"
    out.print(columns(title, names, body, first_left=True))
    if r["chosen"]:
        out.print(f"chosen: {escape(r['chosen'])} -> {escape(r['output'])}", highlight=False)
    else:
        out.print(f"no stack kept FID under {r['cap']:.2f}: nothing written", style="yellow")
    if r.get("plot"):
        out.print(f"plot: {escape(r['plot'])}", highlight=False)


def memory_plan(r: dict[str, Any]) -> None:
    rows = [[k, f"{v:.3f}"] for k, v in r["components"].items() if k != "cfg_doubling"]
    out.print(f"[bold]memory[/]: {escape(r['what'])}")
    table = columns("", ["component", "GB"], rows, first_left=True)
    table.add_row("total", f"{r['total_gb']:.3f}", style="bold")
    out.print(table)
    if "cfg_doubling" in r["components"]:
        out.print(f"of which the unconditional (CFG) rows: {r['components']['cfg_doubling']:.3f} GB", highlight=False)
    for note in r["notes"].values():
        if "included above" not in note:
            out.print(escape(note), style="dim")
