"""``actvar sample``: images from a model."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, execute, handled, show
from .options import Cfg, Compile, Device, Dtype, Json, NumHeads, Overwrite, Seed, TopK, TopP, Vae
from .parsing import parse_int_list, request


@app.command()
def sample(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(..., help="VAR or ActVAR model: a file, an official name in the cache, or tiny."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (resumable: a run's missing images are made)."),
    vae: Vae = None,
    classes: str | None = typer.Option(None, help="Class ids, e.g. 0,7,42 or 0-9, in output order [4 classes]."),
    num_per_class: int = typer.Option(1, help="Images per class."),
    cfg: Cfg = 1.5,
    top_k: TopK = 900,
    top_p: TopP = 0.96,
    seed: Seed = 0,
    batch_size: int = typer.Option(8, help="Images per forward pass (rows double for CFG)."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    more_smooth: bool = typer.Option(False, "--more-smooth", help="Gumbel smoothing for nicer pictures (not for FID)."),
    npz: bool = typer.Option(False, "--npz", help="Also write samples.npz (arr_0: uint8 NHWC) for the ADM evaluator."),
    upstream_seeding: bool = typer.Option(False, "--upstream-seeding", help="Upstream's seeds: seed + batch number."),
    dense: bool = typer.Option(False, "--dense", help="Run an ActVAR model with every token and expert active."),
    overwrite: Overwrite = False,
    num_heads: NumHeads = None,
    compile: Compile = False,
    as_json: Json = False,
) -> None:
    """Generate class-conditional images: one PNG each, a grid.png, and optionally samples.npz.

    Defaults are upstream's FID recipe (cfg 1.5, top-k 900, top-p 0.96).

    Examples: `actvar sample tiny --out samples/` ·
    `actvar sample var_d16.pth --vae vae_ch160v4096z32.pth --classes 0-999 --num-per-class 50 --out fid/ --npz`
    """
    from ..commands import sample as cmd
    from ..generation.sampling import SamplingOptions
    from .render import sample_summary

    with handled():
        opts = SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth)
        classes_list = parse_int_list(classes, "--classes") if classes else None
        req = request(cmd.SampleRequest, ctx.params, model=checkpoint, classes=classes_list, opts=opts)
        result = execute(cmd.run, req)
    show(result, as_json, sample_summary)
