"""The ``actvar`` command line: parse options, call the library, render results with Rich."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    """A path, ``tiny``, or a model already in the Hub cache (``d16``, ``vae``, ``USER/NAME``)."""
    from . import hub
    from .checkpoint import BUILTIN_TINY
    from .errors import CheckpointError

    if spec == BUILTIN_TINY or Path(spec).exists():
        return spec
    repo_like = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    hub_like = spec.lower() in hub.OFFICIAL_FILES or (repo_like and Path(spec).suffix not in (".pth", ".safetensors"))
    if not hub_like:
        return spec  # the loader says "no such file"
    try:
        paths = hub.download(spec, offline=True)
    except ActvarError as e:
        hint = f"run `actvar download {spec}`"
        raise CheckpointError(f"{spec} is neither a file nor a downloaded model", hint) from e
    found = hub.model_file_in(paths)
    if found is None:
        raise CheckpointError(f"no weights file among the downloaded files of {spec}")
    return str(found)


def default_vae_for(model_spec: str, vae: str | None) -> str:
    from .checkpoint import BUILTIN_TINY

    if vae:
        return resolve_source(vae)
    if model_spec == BUILTIN_TINY:
        return BUILTIN_TINY
    raise ConfigError("no VAE given", "pass --vae vae_ch160v4096z32.pth (or --vae vae once downloaded)")


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., help="A .pth/.safetensors file, an official name in the cache, or tiny."),
    num_heads: int | None = typer.Option(None, help="Override the head count (default: depth)."),
    no_hash: bool = typer.Option(False, "--no-hash", help="Skip the sha256 of the file (slow for big files)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
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
    cfg: float = typer.Option(1.5, help="Classifier-free guidance (ramped over scales, as upstream)."),
    top_k: int = typer.Option(900, help="Top-k sampling (0: off)."),
    top_p: float = typer.Option(0.96, help="Top-p sampling (0: off)."),
    seed: int = typer.Option(0, help="Base seed; image i uses a generator seeded from (seed, i)."),
    batch_size: int = typer.Option(8, help="Images per forward pass (rows double for CFG)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."),
    more_smooth: bool = typer.Option(False, "--more-smooth", help="Gumbel smoothing for nicer pictures (not for FID)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (resumable: existing PNGs are kept)."),
    npz: bool = typer.Option(False, "--npz", help="Also write samples.npz (arr_0: uint8 NHWC) for the ADM evaluator."),
    upstream_seeding: bool = typer.Option(
        False, "--upstream-seeding", help="One generator per batch (seed + batch number), exactly as upstream."
    ),
    dense: bool = typer.Option(False, "--dense", help="Run an ActVAR model with every token and expert active."),
    num_heads: int | None = typer.Option(None, help="Override the head count (default: depth)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Generate class-conditional images: one PNG each, a grid.png, and optionally samples.npz.

    Defaults are upstream's FID recipe (cfg 1.5, top-k 900, top-p 0.96).

    Examples: `actvar sample tiny --out samples/` ·
    `actvar sample var_d16.pth --vae vae_ch160v4096z32.pth --classes 0-999 --num-per-class 50 --out fid/ --npz`
    """
    from .checkpoint import check_pair, load_vae, load_var
    from .device import pick_device, resolve_dtype
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
        vae_model, _ = load_vae(default_vae_for(checkpoint, vae), model.cfg.patch_nums)
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


def main() -> None:
    app()
