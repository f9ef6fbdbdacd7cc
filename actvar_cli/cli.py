"""The ``actvar`` command line: parse options, call the library, render results with Rich."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import ActvarError, ConfigError

app = typer.Typer(
    name="actvar",
    help="Turn a pretrained VAR image generator into a cheaper ActVAR model, and use it.\n\n"
    "Try it at once on the built-in tiny model: `actvar demo`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
out = Console()  # results and JSON
err = Console(stderr=True)  # messages, progress
STATE = {"debug": False}


# Options that several commands share, defined once.
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Cfg = Annotated[float, typer.Option(help="Classifier-free guidance (ramped over scales, as upstream).")]
TopK = Annotated[int, typer.Option(help="Top-k sampling (0: off).")]
TopP = Annotated[float, typer.Option(help="Top-p sampling (0: off).")]
Seed = Annotated[int, typer.Option(help="Base seed; image i uses a generator seeded from (seed, i).")]
NumHeads = Annotated[int | None, typer.Option(help="Override the head count (default: depth).")]


def _version(value: bool) -> None:
    if value:
        out.print(f"actvar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    STATE["debug"] = debug


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Typed library errors become one line on stderr and exit code 2."""
    try:
        yield
    except ActvarError as e:
        if STATE["debug"]:
            raise
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: outputs written so far are complete; run again to continue")
        raise typer.Exit(130) from None


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
    )


def task_updater(bar: Progress):
    """A (what, done, total) callback that keeps one bar per ``what``."""
    tasks: dict[str, Any] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total, info="")
        bar.update(tasks[what], completed=done, total=total)

    return update


def parse_int_list(text: str, what: str) -> list[int]:
    """``0,7,42`` or ranges ``0-9``."""
    values: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                values.extend(range(int(lo), int(hi) + 1))
            else:
                values.append(int(part))
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a list of integers", "write e.g. 0,7,42 or 0-9") from None
    return values


def parse_float_list(text: str, what: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a list of numbers", "write e.g. 0.75,0.5") from None


def kv_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(k, str(v))
    return table


# ---------------------------------------------------------------------------
# download / inspect / sample
# ---------------------------------------------------------------------------


@app.command()
def download(
    names: list[str] = typer.Argument(..., help="d16 d20 d24 d30 d36 vae, or REPO_ID, or REPO_ID:FILE."),
    revision: str | None = typer.Option(None, help="Branch, tag or commit."),
    local_dir: Path | None = typer.Option(None, help="Put files here instead of the Hub cache."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local cache (as HF_HUB_OFFLINE=1)."),
    as_json: bool = typer.Option(False, "--json", help="Print the local paths as JSON."),
) -> None:
    """Fetch official VAR weights (or any Hub model) into the Hub cache.

    Examples: `actvar download d16 vae` · `actvar download d30 --local-dir weights/` ·
    `actvar download USER/actvar-d16`
    """
    from . import hub

    with handled():
        results = {}
        for name in names:
            results[name] = [str(p) for p in hub.download(name, revision, local_dir, force, offline)]
    if as_json:
        emit_json(results)
        return
    for name, paths in results.items():
        for p in paths:
            out.print(f"[green]✓[/] {name}: {p}", highlight=False)


def resolve_source(spec: str) -> str:
    from .hub import resolve_local

    return resolve_local(spec)


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., help="A .pth/.safetensors file, an official name in the cache, or tiny."),
    num_heads: NumHeads = None,
    no_hash: bool = typer.Option(False, "--no-hash", help="Skip the sha256 of the file (slow for big files)."),
    as_json: Json = False,
) -> None:
    """Say what a checkpoint is: kind, inferred config, parameters, dtype, hash.

    Examples: `actvar inspect var_d16.pth` · `actvar inspect out/model.safetensors --json`
    """
    from .inspection import inspect_checkpoint

    with handled():
        report = inspect_checkpoint(resolve_source(checkpoint), num_heads=num_heads, with_hash=not no_hash)
    if as_json:
        emit_json(report)
        return
    rows = {k: v for k, v in report.items() if k not in ("config", "metadata")}
    out.print(kv_table(f"{report['kind']} checkpoint", rows))
    out.print(kv_table("inferred config", report["config"]))
    if report.get("metadata"):
        out.print(kv_table("metadata", report["metadata"]))


@app.command()
def sample(
    checkpoint: str = typer.Argument(..., help="VAR or ActVAR model: a file, an official name in the cache, or tiny."),
    vae: str | None = typer.Option(None, help="The VQVAE (vae_ch160v4096z32.pth); defaults to tiny for tiny."),
    classes: str = typer.Option("980,437,22,562", help="Class ids, e.g. 0,7,42 or 0-9, in output order."),
    num_per_class: int = typer.Option(1, help="Images per class."),
    cfg: Cfg = 1.5,
    top_k: TopK = 900,
    top_p: TopP = 0.96,
    seed: Seed = 0,
    batch_size: int = typer.Option(8, help="Images per forward pass (rows double for CFG)."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    more_smooth: bool = typer.Option(False, "--more-smooth", help="Gumbel smoothing for nicer pictures (not for FID)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (resumable: existing PNGs are kept)."),
    npz: bool = typer.Option(False, "--npz", help="Also write samples.npz (arr_0: uint8 NHWC) for the ADM evaluator."),
    upstream_seeding: bool = typer.Option(
        False, "--upstream-seeding", help="One generator per batch (seed + batch number), exactly as upstream."
    ),
    dense: bool = typer.Option(False, "--dense", help="Run an ActVAR model with every token and expert active."),
    num_heads: NumHeads = None,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Generate class-conditional images: one PNG each, a grid.png, and optionally samples.npz.

    Defaults are upstream's FID recipe (cfg 1.5, top-k 900, top-p 0.96).

    Examples: `actvar sample tiny --out samples/` ·
    `actvar sample var_d16.pth --vae vae_ch160v4096z32.pth --classes 0-999 --num-per-class 50 --out fid/ --npz`
    """
    from .checkpoint import check_pair, load_vae, load_var
    from .device import pick_device, resolve_dtype
    from .hub import find_vae
    from .sample_job import SampleJob, finish_outputs, run_sample_job
    from .sampling import SamplingOptions

    with handled():
        job = SampleJob(
            classes=parse_int_list(classes, "--classes"),
            num_per_class=num_per_class,
            seed=seed,
            batch_size=batch_size,
            opts=SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth),
            upstream_seeding=upstream_seeding,
        )
        dev = pick_device(device)
        dt = resolve_dtype(dtype, dev)
        model, info = load_var(resolve_source(checkpoint), num_heads=num_heads)
        job.validate(model.num_classes)
        vae_model, _ = load_vae(find_vae(info.metadata, vae), model.cfg.patch_nums)
        check_pair(model.cfg, vae_model)
        model.to(dev)
        vae_model.to(dev)
        policy = None if dense else getattr(model, "policy", None)
        with progress_bar() as bar:
            task = bar.add_task("sampling", total=job.total, info="")

            def on_progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = run_sample_job(model, vae_model, job, out_dir, dev, dt, policy, progress=on_progress)
        grid_path, npz_path = finish_outputs(job, out_dir, npz)
    summary = {
        "out_dir": str(result.out_dir),
        "model": info.name,
        "kind": info.kind,
        "images": job.total,
        "generated": result.generated,
        "skipped": result.skipped,
        "seconds": round(result.seconds, 3),
        "images_per_s": round(result.images_per_s, 3),
        "device": str(dev),
        "dtype": dt,
        "grid": str(grid_path) if grid_path else None,
        "npz": str(npz_path) if npz_path else None,
    }
    if as_json:
        emit_json(summary)
        return
    out.print(
        f"[green]✓[/] {job.total} images in {result.out_dir} ({result.generated} new, {result.skipped} kept); "
        f"{result.images_per_s:.2f} images/s on {dev} ({dt})",
        highlight=False,
    )
    if npz_path:
        out.print(f"  npz: {npz_path}", highlight=False)


@app.command("random-weights")
def random_weights(
    arch: str = typer.Argument(..., help="d16, d20, d24, d30, d36, tiny, or vae (the ch160 VQVAE)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write (.safetensors or .pth)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Write a model of an official architecture with seeded random weights (no download).

    For benchmarks and dry runs: `actvar random-weights d16 -o d16-random.safetensors` ·
    `actvar random-weights vae -o vae-random.safetensors`
    """
    from .checkpoint import atomic_write_with, save_safetensors
    from .config import VAEConfig, arch_config
    from .model import VAR
    from .tiny import random_state_dict
    from .vqvae import VQVAE

    with handled():
        if arch.lower() == "vae":
            sd = random_state_dict(VQVAE(VAEConfig()), seed)
            meta = {"format": "actvar", "kind": "vqvae", "random_seed": seed}
        else:
            cfg = arch_config(arch)
            sd = random_state_dict(VAR(cfg), seed)
            meta = {"format": "actvar", "kind": "var", "var_config": cfg.to_dict(), "random_seed": seed}
        if output.suffix == ".pth":
            import torch

            atomic_write_with(output, lambda tmp: torch.save(sd, tmp))
        else:
            save_safetensors(sd, output, meta)
    out.print(f"[green]✓[/] {arch} with random weights (seed {seed}): {output}", highlight=False)


# ---------------------------------------------------------------------------
# moefy / flops / bench
# ---------------------------------------------------------------------------


def policy_recipe(recipe, scales, token_rate, token_rates, weight_rate):
    """``recipe`` with the policy flags applied."""
    from .recipes import with_policy_flags

    return with_policy_flags(
        recipe,
        scales=parse_int_list(scales, "--scales") if scales else None,
        token_rate=token_rate,
        token_rates=parse_float_list(token_rates, "--token-rates") if token_rates else None,
        weight_rate=weight_rate,
    )


def optional_vae(metadata: dict[str, str], vae: str | None) -> str | None:
    """The VAE to calibrate with: --vae, the model's own (tiny's for tiny), or the cached official one."""
    from .hub import find_vae

    if vae:
        return resolve_source(vae)
    try:
        return find_vae(metadata, None)
    except ActvarError:
        return None


@app.command()
def moefy(
    checkpoint: str = typer.Argument(..., help="The dense VAR: a file, an official name in the cache, or tiny."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the ActVAR model (.safetensors)."),
    experts: int | None = typer.Option(None, "--experts", help="Experts per FFN [recipe: 16]."),
    split: str | None = typer.Option(None, help="cluster | contiguous | coactivation [recipe: cluster]."),
    scales: str | None = typer.Option(None, help="1-based sparse scales, e.g. 9,10 [recipe: last two]."),
    token_rate: float | None = typer.Option(None, help="Fraction of tokens kept on every sparse scale [0.75]."),
    token_rates: str | None = typer.Option(None, help="Per sparse scale, e.g. 0.5,0.75."),
    weight_rate: float | None = typer.Option(None, help="Fraction of experts each kept token uses [0.75]."),
    vae: str | None = typer.Option(None, help="VQVAE for calibration (default: tiny's, or the cached official one)."),
    calib_images: int | None = typer.Option(None, help="Self-generated images to fit router/selector [8]; 0: weights."),
    config: str | None = typer.Option(None, "--config", help="Recipe YAML (or d16, tiny); flags override its keys."),
    seed: int = typer.Option(0, help="Seed of calibration and clustering."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (for calibration)."),
    num_heads: NumHeads = None,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Convert a dense VAR into an ActVAR model: FFN experts, routers and token selectors.

    Examples: `actvar moefy var_d16.pth --experts 16 -o actvar-d16.safetensors --vae vae_ch160v4096z32.pth` ·
    `actvar moefy tiny -o tiny-actvar.safetensors --token-rates 0.5,0.75 --weight-rate 0.5`
    """
    from .checkpoint import load_vae, load_var, save_model, sha256_file
    from .conversion import MoefyOptions, check_options
    from .conversion import moefy as convert
    from .device import pick_device
    from .recipes import load_recipe

    with handled():
        recipe = load_recipe(config).override(experts=experts, split=split, calib_images=calib_images)
        recipe = policy_recipe(recipe, scales, token_rate, token_rates, weight_rate)
        source = resolve_source(checkpoint)
        dense, info = load_var(source, num_heads=num_heads)
        opts = MoefyOptions(
            num_experts=recipe.experts,
            split=recipe.split,
            policy=recipe.policy(),
            calib_images=recipe.calib_images,
            seed=seed,
        )
        check_options(dense.cfg, opts)
        vae_source = optional_vae(info.metadata, vae)  # recorded in the output even when not calibrating
        use_vae = vae_source and opts.calib_images > 0
        vae_model = load_vae(vae_source, dense.cfg.patch_nums)[0] if use_vae else None
        dev = pick_device(device)
        with progress_bar(transient=True) as bar:
            on_progress = task_updater(bar)

            model, report = convert(dense, vae_model, opts, device=dev, progress=on_progress)
        meta = {
            "base_checkpoint": info.name,
            "base_checkpoint_path": str(Path(source).resolve()) if info.format != "builtin" else source,
            "base_sha256": sha256_file(source) if info.format != "builtin" else "",
            "experts": opts.num_experts,
            "split": opts.split,
            "router_init": report.router_init,
            "vae": (str(Path(vae_source).resolve()) if vae_source != "tiny" else vae_source) if vae_source else "",
            "calibration": {
                "images": report.calib_images,
                "tokens_per_block": report.calib_tokens,
                "router_r2": _mean(report.router_r2),
                "selector_r2": _mean(report.selector_r2),
                "router_topk_agreement": _mean(report.router_topk_agreement),
            },
            "actvar_version": __version__,
        }
        save_model(model, output, meta)
    summary = {"output": str(output), "policy": model.policy.to_dict(), **meta}
    if as_json:
        emit_json(summary)
        return
    if report.router_init == "weight-statistics":
        err.print(
            "[yellow]note:[/] no VAE for calibration: router and selector start from weight statistics "
            "(pass --vae to fit them on self-generated tokens)"
        )
    out.print(kv_table(f"ActVAR model written to {output}", {k: v for k, v in summary.items() if k != "output"}))


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


@app.command()
def flops(
    model: str | None = typer.Argument(None, help="A VAR or ActVAR checkpoint (or give --arch)."),
    arch: str | None = typer.Option(None, help="d16 .. d36 or tiny, instead of a checkpoint."),
    experts: int | None = typer.Option(None, "--experts", help="Experts per FFN [model's, or 16]."),
    scales: str | None = typer.Option(None, help="1-based sparse scales [model's policy, or 9,10]."),
    token_rate: float | None = typer.Option(None, help="Token rate on every sparse scale."),
    token_rates: str | None = typer.Option(None, help="Token rate per sparse scale, e.g. 0.5,0.75."),
    weight_rate: float | None = typer.Option(None, help="Fraction of experts each kept token uses."),
    paper_table: bool = typer.Option(False, "--paper-table", help="Our savings beside the paper's, for its settings."),
    as_json: Json = False,
) -> None:
    """FLOPs of generating one image (with CFG), dense vs ActVAR, per scale and per component.

    Examples: `actvar flops --arch d16` · `actvar flops actvar-d16.safetensors --json` ·
    `actvar flops --arch d20 --token-rates 0.5,0.25 --weight-rate 0.5` · `actvar flops --paper-table`
    """
    from . import flops as F
    from .checkpoint import read_checkpoint
    from .config import arch_config
    from .recipes import Recipe

    with handled():
        if paper_table:
            rows = F.paper_table()
            if as_json:
                emit_json(rows)
                return
            table = Table(title="FLOPs savings: ours vs the paper (one image, CFG)", title_justify="left")
            for col in ("model", "scales", "token rates", "weight rate", "paper", "ours", "paper eq. 12"):
                table.add_column(col, justify="right")
            for r in rows:
                table.add_row(
                    r["arch"],
                    ",".join(map(str, r["scales"])),
                    ",".join(f"{x:g}" for x in r["token_rates"]),
                    f"{r['weight_rate']:g}",
                    f"{r['paper_savings']:.1%}",
                    f"{r['our_savings']:.1%}",
                    f"{r['paper_eq12_savings']:.1%}",
                )
            out.print(table)
            out.print("Why they differ: docs/flops.md", style="dim")
            return
        if (model is None) == (arch is None):
            raise ConfigError("give a model checkpoint or --arch, not both or neither")
        base = Recipe()
        if model is not None:
            _, info = read_checkpoint(resolve_source(model))
            if info.kind == "vqvae":
                raise ConfigError(f"{model} is a VQVAE; FLOPs are counted for VAR models")
            cfg = info.var_config
            if info.policy is not None:
                p = info.policy
                base = base.override(
                    scales=list(p.scales), token_rates=list(p.token_rates), weight_rate=p.weight_rates[0]
                )
        else:
            cfg = arch_config(arch)
        recipe = policy_recipe(base, scales, token_rate, token_rates, weight_rate)
        n_exp = experts or cfg.num_experts or 16
        report = F.count_flops(cfg.replace(num_experts=0), recipe.policy(), n_exp)
    data = report.to_dict()
    if as_json:
        emit_json(data)
        return
    table = Table(title=f"FLOPs per image (CFG), depth {cfg.depth}, width {cfg.embed_dim}", title_justify="left")
    for col in ("scale", "tokens", "kept", "experts", "dense GFLOPs", "ActVAR GFLOPs", "saved"):
        table.add_column(col, justify="right")
    for s in data["per_scale"]:
        saved = 1 - s["sparse_flops"] / s["dense_flops"]
        table.add_row(
            str(s["scale"]),
            str(s["tokens"]),
            str(s["kept_tokens"]),
            f"{s['kept_experts']}/{n_exp}",
            f"{s['dense_flops'] / 1e9:.2f}",
            f"{s['sparse_flops'] / 1e9:.2f}",
            f"{saved:.1%}" if saved else "",
        )
    table.add_row(
        "all",
        "",
        "",
        "",
        f"{report.dense_flops / 1e9:.2f}",
        f"{report.sparse_flops / 1e9:.2f}",
        f"{report.savings:.1%}",
        style="bold",
    )
    out.print(table)
    comp = Table(title="by component (GFLOPs)", title_justify="left")
    for col in ("component", "dense", "ActVAR"):
        comp.add_column(col, justify="right")
    for c in F.COMPONENTS:
        comp.add_row(c, f"{data['components']['dense'][c] / 1e9:.2f}", f"{data['components']['sparse'][c] / 1e9:.2f}")
    out.print(comp)
    out.print(f"savings {report.savings:.1%}; ideal speedup {data['ideal_speedup']:.3f}x", highlight=False)


@app.command()
def bench(
    dense: str | None = typer.Argument(None, help="The dense VAR (or give --arch)."),
    sparse: str | None = typer.Argument(None, help="The ActVAR model converted from it."),
    arch: str | None = typer.Option(None, help="Benchmark random-weight models of this architecture (d16, tiny...)."),
    vae: str | None = typer.Option(None, help="VQVAE for the decode timing (default: random weights of its shape)."),
    batch_size: int = typer.Option(8, help="Images per generation (rows double for CFG)."),
    repeats: int = typer.Option(5, help="Timed runs per model (median reported)."),
    warmup: int = typer.Option(1, help="Untimed runs per model first."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: int = typer.Option(0, help="Seed of the per-image generators."),
    as_json: Json = False,
) -> None:
    """Measured speed of dense vs ActVAR generation, beside the FLOPs' ideal speedup.

    Examples: `actvar bench var_d16.pth actvar-d16.safetensors --vae vae_ch160v4096z32.pth` ·
    `actvar bench --arch d16 --batch-size 8 --json` (random weights: timing does not depend on them)
    """
    from . import bench as B
    from .device import pick_device, resolve_dtype

    with handled():
        dev = pick_device(device)
        dt = resolve_dtype(dtype, dev)
        dense_model, sparse_model, vae_model, note = B.load_pair(dense, sparse, arch, vae)
        for m in (dense_model, sparse_model, vae_model):
            m.to(dev)
        with progress_bar() as bar:
            task = bar.add_task("benchmark", total=2 * (warmup + repeats), info="")
            result = B.bench(
                dense_model,
                sparse_model,
                vae_model,
                dev,
                dt,
                batch_size,
                repeats,
                warmup,
                seed=seed,
                progress=lambda d, t: bar.update(task, completed=d, total=t),
            )
        result["note"] = note
    if as_json:
        emit_json(result)
        return
    table = Table(
        title=f"dense vs ActVAR on {dev} ({dt}), batch {batch_size}, median of {repeats}", title_justify="left"
    )
    for col in ("", "generation s", "decode s", "images/s", "images/s end-to-end", "peak MB"):
        table.add_column(col, justify="right")
    for name in ("dense", "sparse"):
        r = result[name]
        table.add_row(
            name,
            f"{r['generation_s']:.3f}",
            f"{r['decode_s']:.3f}",
            f"{r['images_per_s']:.3f}",
            f"{r['images_per_s_end_to_end']:.3f}",
            f"{r['peak_memory_mb']:.0f}",
        )
    out.print(table)
    eff = result["efficiency"]
    out.print(
        f"speedup {result['speedup']:.3f}x (transformer), {result['speedup_end_to_end']:.3f}x end-to-end; "
        f"ideal {result['ideal_speedup']:.3f}x from FLOPs (savings {result['savings']:.1%})"
        + (f"; {eff:.0%} of the ideal gain" if eff is not None else ""),
        highlight=False,
    )
    if note:
        out.print(note, style="dim")


# ---------------------------------------------------------------------------
# distillation
# ---------------------------------------------------------------------------


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs, values read as YAML (numbers, lists, strings)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE", "e.g. --set teacher_top_k=600")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _distill_command(stage: int):
    what = "routers and selectors" if stage == 1 else "experts, attention and head"
    epochs_default = "2" if stage == 1 else "10"

    def command(
        model: str = typer.Argument(
            ..., help="The ActVAR model (from moefy" + (")." if stage == 1 else " or stage 1).")
        ),
        out_dir: Path = typer.Option(
            ..., "--out-dir", help="Output folder: model.safetensors, metrics.jsonl, checkpoints."
        ),
        teacher: str | None = typer.Option(None, help="The dense VAR [the base checkpoint named in the model]."),
        vae: str | None = typer.Option(None, help="The VQVAE [the one used by moefy, or the cached official one]."),
        data: str | None = typer.Option(None, help="teacher (data-free), an ImageFolder, or a token cache [teacher]."),
        cache_tokens: Path | None = typer.Option(
            None, help="Encode an ImageFolder once into this folder and reuse it."
        ),
        config: str | None = typer.Option(
            None, "--config", help="Recipe YAML (or d16, tiny); flags override its keys."
        ),
        epochs: float | None = typer.Option(None, help=f"Epochs of this stage [recipe: {epochs_default}]."),
        max_steps: int | None = typer.Option(None, help="Stop after this many optimizer steps (short runs)."),
        batch_size: int = typer.Option(
            8, help="Images per process and micro-step; accumulation reaches the global batch."
        ),
        global_batch: int | None = typer.Option(None, help="Images per optimizer step [recipe: 512]."),
        lr: float | None = typer.Option(None, help="Peak learning rate of this stage [recipe: 2e-4]."),
        weight_decay: float | None = typer.Option(None, help="AdamW weight decay [recipe: 0.05]."),
        alpha: float | None = typer.Option(None, help="Stage 1 distillation weight [recipe: 0.05]."),
        beta: float | None = typer.Option(None, help="Stage 1 load-balancing weight [recipe: 0.01]."),
        checkpoint_every: int | None = typer.Option(None, help="Steps between checkpoints [recipe: 500]."),
        seed: int | None = typer.Option(None, help="Seed of data order, dropout and teacher sampling [recipe: 0]."),
        precision: str | None = typer.Option(None, help="auto, fp32 or bf16 [recipe: auto]."),
        set_: list[str] = typer.Option([], "--set", help="Any other recipe key: --set KEY=VALUE (repeatable)."),
        resume: bool = typer.Option(
            False, "--resume", help="Continue from the newest complete checkpoint in --out-dir."
        ),
        device: str = typer.Option("auto", help="auto or cpu."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    ) -> None:
        from .distill import DistillJob, run_distillation
        from .recipes import load_recipe

        with handled():
            recipe = load_recipe(config).override(**parse_set(set_))
            recipe = recipe.override(**{f"stage{stage}_lr": lr})  # --lr is this stage's rate
            recipe = recipe.override(
                global_batch=global_batch, weight_decay=weight_decay, alpha=alpha, beta=beta,
                checkpoint_every=checkpoint_every, seed=seed, precision=precision,
            )  # fmt: skip
            job = DistillJob(
                stage=stage, model=model, out_dir=out_dir, recipe=recipe, vae=vae, teacher=teacher, data=data,
                cache_tokens=cache_tokens, batch_size=batch_size, epochs=epochs, max_steps=max_steps,
                resume=resume, device=device,
            )  # fmt: skip
            with progress_bar() as bar:
                tasks: dict[str, Any] = {}

                def on_step(ev: dict[str, Any]) -> None:
                    if ev["event"] == "encode":
                        if "encode" not in tasks:
                            tasks["encode"] = bar.add_task("encoding", total=ev["total"], info="")
                        bar.update(tasks["encode"], completed=ev["done"])
                    elif ev["event"] == "start":
                        tasks["train"] = bar.add_task(
                            f"stage {stage}", total=ev["total_steps"], completed=ev["step"], info=""
                        )
                    else:
                        keys = ("loss", "cls", "dis_w", "dis_t", "bl_w", "bl_t", "kl", "hidden_mse")
                        terms = " ".join(f"{k} {ev[k]:.4f}" for k in keys if k in ev)
                        info = f"{terms} | {ev['samples_per_s']:.1f} samples/s"
                        bar.update(tasks["train"], completed=ev["step"], info=info)

                summary = run_distillation(job, on_step)
        if as_json:
            emit_json(summary)
            return
        if summary is None:
            return
        rows = {k: summary[k] for k in ("steps", "epochs", "global_batch", "num_processes", "grad_accum", "data")}
        rows.update(summary["final_losses"])
        rows["samples/s"] = round(summary["samples_per_s"], 2)
        out.print(kv_table(f"stage {stage} done: {out_dir / 'model.safetensors'}", rows))

    command.__doc__ = (
        f"Distillation stage {stage}: train the {what}, everything else frozen.\n\n"
        + (
            "Loss (supp. eq. 19): L_cls + sum over blocks of alpha (L_dis^w + L_dis^t) + beta (L_bl^w + L_bl^t).\n\n"
            if stage == 1
            else "Loss (supp. eq. 22): L_cls + KL(student || teacher) + mean over blocks of the hidden-state MSE.\n\n"
        )
        + f"Examples: `actvar distill-stage{stage} actvar-d16.safetensors --vae vae_ch160v4096z32.pth "
        f"--data /data/imagenet --cache-tokens tokens/ --config recipes/actvar-d16.yaml --out-dir runs/s{stage}` · "
        f"`accelerate launch --multi_gpu --num_processes 8 -m actvar_cli distill-stage{stage} ...` · "
        f"`actvar distill-stage{stage} tiny-actvar.safetensors --config tiny --max-steps 20 --out-dir runs/tiny{stage}`"
    )
    return command


app.command("distill-stage1")(_distill_command(1))
app.command("distill-stage2")(_distill_command(2))


# ---------------------------------------------------------------------------
# eval / push / demo
# ---------------------------------------------------------------------------


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="The model to evaluate (ActVAR or dense VAR)."),
    vae: str | None = typer.Option(None, help="The VQVAE [tiny's for tiny, else the cached official one]."),
    fid: bool = typer.Option(False, "--fid", help="Frechet Inception Distance against --ref."),
    isc: bool = typer.Option(False, "--is", help="Inception Score."),
    prc: bool = typer.Option(False, "--prc", help="Precision and recall against --ref."),
    ref: str | None = typer.Option(
        None,
        help="Reference images: a folder, or an ADM batch such as "
        "VIRTUAL_imagenet256_labeled.npz (statistics cached beside it).",
    ),
    teacher: str | None = typer.Option(None, help="Compare with this dense model ('auto': the model's base)."),
    num: int = typer.Option(32, help="Teacher-sampled pyramids for the teacher comparison."),
    psnr_images: int | None = typer.Option(None, help="Image pairs for the PSNR, at most --num [= --num]."),
    classes: str = typer.Option("0-999", help="Classes to sample for FID."),
    num_per_class: int = typer.Option(50, help="Images per class for FID (upstream: 50 x 1000)."),
    cfg: Cfg = 1.5,
    top_k: TopK = 900,
    top_p: TopP = 0.96,
    seed: Seed = 0,
    batch_size: int = typer.Option(16, help="Images per forward pass."),
    out_dir: Path | None = typer.Option(None, "--out", help="Where samples and eval.json go [eval-<model>/]."),
    inception_weights: str | None = typer.Option(
        None, help="torch-fidelity Inception weights file (or ACTVAR_INCEPTION_WEIGHTS); auto: let it download."
    ),
    dense: bool = typer.Option(False, "--dense", help="Every token and expert active."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    as_json: Json = False,
) -> None:
    """Score a model: FID / IS / precision-recall, and agreement with the dense teacher.

    Examples: `actvar eval actvar-d16.safetensors --vae vae --fid --is --prc --ref VIRTUAL_imagenet256_labeled.npz
    --inception-weights weights-inception-2015-12-05-6726825d.pth` ·
    `actvar eval runs/s2/model.safetensors --teacher auto --num 64 --json` ·
    `accelerate launch --multi_gpu --num_processes 8 -m actvar_cli eval ... --fid --ref ...` (sharded sampling)
    """
    from .evaluate import EvalJob, run_eval
    from .sampling import SamplingOptions

    with handled():
        src = resolve_source(model)
        job = EvalJob(
            model=src, vae=vae,
            out_dir=out_dir or Path(f"eval-{Path(src).stem}"), fid=fid, isc=isc, prc=prc, ref=ref,
            teacher=teacher, num=num, psnr_images=psnr_images, classes=parse_int_list(classes, "--classes"),
            num_per_class=num_per_class, opts=SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p), seed=seed,
            batch_size=batch_size, device=device, dtype=dtype, inception_weights=inception_weights, dense=dense,
        )  # fmt: skip
        with progress_bar() as bar:
            on_progress = task_updater(bar)

            results = run_eval(job, on_progress)
    if results is None:  # not the main process
        return
    if as_json:
        emit_json(results)
        return
    table = Table(title=f"evaluation of {results['model']}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("FLOPs saved", f"{results['flops']['savings']:.1%}")
    for key, label in (
        ("fid", "FID"),
        ("inception_score", "Inception Score"),
        ("precision", "precision"),
        ("recall", "recall"),
        ("token_agreement", "token agreement (sparse scales)"),
        ("logit_kl", "KL(teacher || model) (sparse scales)"),
        ("psnr_db", "PSNR vs teacher (dB)"),
    ):
        if key in results:
            table.add_row(label, f"{results[key]:.4f}")
    out.print(table)
    if "per_scale" in results:
        ps = Table(title="per scale (teacher forcing)", title_justify="left")
        for col in ("scale", "tokens", "sparse", "token agreement", "KL"):
            ps.add_column(col, justify="right")
        for r in results["per_scale"]:
            ps.add_row(
                str(r["scale"]),
                str(r["tokens"]),
                "yes" if r["sparse"] else "",
                f"{r['token_agreement']:.4f}",
                f"{r['logit_kl']:.4f}",
            )
        out.print(ps)
    out.print(f"results: {results['eval_json']}", highlight=False)


@app.command()
def push(
    model: Path = typer.Argument(..., help="The ActVAR model.safetensors to publish."),
    repo: str = typer.Option(..., "--repo", help="USER/NAME on the Hub."),
    private: bool = typer.Option(False, "--private", help="Create a private repository."),
    dry_run: Path | None = typer.Option(None, "--dry-run", help="Write the folder here instead of uploading."),
    eval_json: Path | None = typer.Option(None, "--eval", help="eval.json to show in the card [found next to MODEL]."),
    token: str | None = typer.Option(None, help="Hub token [HF_TOKEN or the saved login]."),
) -> None:
    """Publish a model to the Hub: model.safetensors, config.json and a model card.

    Examples: `actvar push runs/s2/model.safetensors --repo me/actvar-d16` ·
    `actvar push runs/s2/model.safetensors --repo me/actvar-d16 --dry-run card/`
    """
    from . import hub

    with handled():
        hub.parse_target(repo)
        evals = None
        candidates = [eval_json] if eval_json else [model.parent / "eval.json"]
        for c in candidates:
            if c and c.exists():
                evals = json.loads(c.read_text())
        if dry_run:
            folder = hub.write_push_folder(model, repo, dry_run, evals)
            out.print(f"[green]✓[/] wrote {', '.join(sorted(p.name for p in folder.iterdir()))} to {folder}")
            return
        url = hub.push(model, repo, private=private, evals=evals, token=token)
    out.print(f"[green]✓[/] pushed to {repo}: {url}", highlight=False)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("actvar-demo"), "--out", help="Where everything goes."),
    stage1_steps: int = typer.Option(30, help="Optimizer steps of stage 1."),
    stage2_steps: int = typer.Option(40, help="Optimizer steps of stage 2."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """The whole job on the built-in tiny model, in a few minutes on a CPU.

    moefy -> stage 1 -> stage 2 -> samples -> eval against the teacher -> FLOPs and speed,
    ending with one summary table. Example: `actvar demo --out demo/`
    """
    from .demo import run_demo

    with handled():
        with progress_bar() as bar:
            on_progress = task_updater(bar)

            summary = run_demo(
                out_dir, stage1_steps, stage2_steps, step=lambda m: bar.console.print(f"[bold]{m}"),
                progress=on_progress,
            )  # fmt: skip
    if as_json:
        emit_json(summary)
        return
    table = Table(title="actvar demo (tiny model)", title_justify="left")
    table.add_column("")
    table.add_column("before distillation", justify="right")
    table.add_column("after", justify="right")
    table.add_row("FLOPs saved", f"{summary['flops_savings']:.1%}", "")
    table.add_row(
        "measured speedup (transformer)",
        "",
        f"{summary['measured_speedup']:.2f}x (ideal {summary['ideal_speedup']:.2f}x)",
    )
    table.add_row(
        "router agreement with pseudo-labels",
        f"{summary['router_agreement_before']:.3f}",
        f"{summary['router_agreement_after_stage1']:.3f} (stage 1)",
    )
    table.add_row(
        "selector agreement with pseudo-labels",
        f"{summary['selector_agreement_before']:.3f}",
        f"{summary['selector_agreement_after_stage1']:.3f} (stage 1)",
    )
    table.add_row(
        "token agreement with teacher",
        f"{summary['token_agreement_before']:.3f}",
        f"{summary['token_agreement_after']:.3f}",
    )
    table.add_row("KL(teacher || ActVAR)", f"{summary['logit_kl_before']:.4f}", f"{summary['logit_kl_after']:.4f}")
    table.add_row("PSNR vs teacher images (dB)", f"{summary['psnr_db_before']:.2f}", f"{summary['psnr_db_after']:.2f}")
    out.print(table)
    out.print(f"model: {summary['model']}\ngrid: {summary['grid']}\n{summary['note']}", highlight=False)


def main() -> None:
    app()
