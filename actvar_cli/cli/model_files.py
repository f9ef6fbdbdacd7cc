"""Commands about model files: download, inspect, random-weights, push."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, execute, handled, show
from .options import Json, NumHeads, Overwrite
from .render import escape, out


@app.command()
def download(
    names: list[str] = typer.Argument(..., help="d16 d20 d24 d30 d36 vae, or REPO_ID, or REPO_ID:FILE."),
    revision: str | None = typer.Option(None, help="Branch, tag or commit."),
    local_dir: Path | None = typer.Option(None, help="Put files here instead of the Hub cache."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local cache (as HF_HUB_OFFLINE=1)."),
    as_json: Json = False,
) -> None:
    """Fetch official VAR weights (or any Hub model) into the Hub cache.

    Examples: `actvar download d16 vae` · `actvar download d30 --local-dir weights/` ·
    `actvar download USER/actvar-d16`
    """
    from ..commands import download as cmd

    with handled():
        req = cmd.DownloadRequest(names, revision=revision, local_dir=local_dir, force=force, offline=offline)
        result = execute(cmd.run, req, progress=False)

    def table(files: dict) -> None:
        for name, paths in files.items():
            for p in paths:
                out.print(f"[green]✓[/] {escape(name)}: {escape(p)}", highlight=False)

    show(result, as_json, table)


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
    from ..commands import inspect as cmd
    from . import render

    with handled():
        req = cmd.InspectRequest(checkpoint, num_heads=num_heads, with_hash=not no_hash)
        result = execute(cmd.run, req, progress=False)
    show(result, as_json, render.inspect_report)


@app.command("random-weights")
def random_weights(
    arch: str = typer.Argument(..., help="dN (d12, d16 … d36), tiny, or vae (the ch160 VQVAE)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write (.safetensors or .pth)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    as_json: Json = False,
) -> None:
    """Write a model of an official architecture with seeded random weights (no download).

    For benchmarks and dry runs: `actvar random-weights d16 -o d16-random.safetensors` ·
    `actvar random-weights vae -o vae-random.safetensors`
    """
    from ..commands import random_weights as cmd

    with handled():
        result = execute(cmd.run, cmd.RandomWeightsRequest(arch, output, seed), progress=False)

    def table(r: dict) -> None:
        out.print(f"[green]✓[/] {escape(arch)} with random weights (seed {seed}): {escape(r['output'])}")

    show(result, as_json, table)


@app.command()
def push(
    model: Path = typer.Argument(..., help="The ActVAR model.safetensors to publish."),
    repo: str = typer.Option(..., "--repo", help="USER/NAME on the Hub."),
    private: bool = typer.Option(False, "--private", help="Create a private repository."),
    dry_run: Path | None = typer.Option(None, "--dry-run", help="Write the folder here instead of uploading."),
    eval_json: Path | None = typer.Option(None, "--eval", help="eval.json to show in the card [found next to MODEL]."),
    token: str | None = typer.Option(None, help="Hub token [HF_TOKEN or the saved login]."),
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Publish a model to the Hub: model.safetensors, config.json and a model card.

    Examples: `actvar push runs/s2/model.safetensors --repo me/actvar-d16` ·
    `actvar push runs/s2/model.safetensors --repo me/actvar-d16 --dry-run card/`
    """
    from ..commands import push as cmd

    with handled():
        req = cmd.PushRequest(
            model, repo, private=private, dry_run=dry_run, eval_json=eval_json, token=token, overwrite=overwrite
        )
        result = execute(cmd.run, req, progress=False)

    def table(r: dict) -> None:
        where = f"wrote {', '.join(r['files'])} to {r['folder']}" if dry_run else f"pushed to {repo}: {r['url']}"
        out.print(f"[green]✓[/] {escape(where)}", highlight=False)

    show(result, as_json, table)
