"""``actvar moefy`` and ``actvar quantize``: a model becomes a cheaper one."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, execute, handled, show
from .options import Config, Device, Dtype, Json, NumHeads, Scales, TokenRate, TokenRates, Vae, WeightRate
from .parsing import policy_flags, request
from .render import err, kv_table, out


@app.command()
def moefy(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(..., help="The dense VAR: a file, an official name in the cache, or tiny."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the ActVAR model (.safetensors)."),
    experts: int | None = typer.Option(None, "--experts", help="Experts per FFN [recipe: 16]."),
    split: str | None = typer.Option(None, help="cluster | contiguous | coactivation [recipe: cluster]."),
    scales: Scales = None,
    token_rate: TokenRate = None,
    token_rates: TokenRates = None,
    weight_rate: WeightRate = None,
    vae: Vae = None,
    calib_images: int | None = typer.Option(
        None, help="Images generated to fit routers, selector, expert means [recipe: 64 tiny, 8 d16]; 0: from weights."
    ),
    config: Config = None,
    seed: int = typer.Option(0, help="Seed of calibration and clustering."),
    method: str | None = typer.Option(None, help="Another method's model, or a stack: cfg-sharp:2+w8a8."),
    device: Device = "auto",
    num_heads: NumHeads = None,
    as_json: Json = False,
) -> None:
    """Convert a dense VAR into an ActVAR model: FFN experts, routers and token selectors.

    Without `--config` the recipe named for the model is used (`tiny`, `d16` …).

    Examples: `actvar moefy var_d16.pth --experts 16 -o actvar-d16.safetensors --vae vae_ch160v4096z32.pth` ·
    `actvar moefy tiny -o tiny-actvar.safetensors --token-rates 0.5,0.75 --weight-rate 0.5`
    """
    from ..commands import moefy as cmd

    with handled():
        flags = policy_flags(scales, token_rate, token_rates, weight_rate)
        req = request(cmd.MoefyRequest, ctx.params, source=checkpoint, policy_flags=flags)
        result = execute(cmd.run, req, transient=True)

    def table(summary: dict) -> None:
        if summary["router_init"] == "weight-statistics":
            err.print(
                "[yellow]note:[/] no VAE for calibration: router and selector start from weight statistics "
                "(pass --vae to fit them on self-generated tokens)"
            )
        out.print(kv_table(f"ActVAR model written to {output}", {k: v for k, v in summary.items() if k != "output"}))

    show(result, as_json, table)


@app.command()
def quantize(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(..., help="A VAR or ActVAR model: a file, a name in the cache, or tiny."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the quantized model (.safetensors)."),
    weights: str = typer.Option(
        ..., "--weights", help="int8 (a scale per output row) | int4 (a scale per group of inputs, two values a byte)."
    ),
    group_size: int | None = typer.Option(
        None, "--group-size", help="Inputs sharing one int4 scale; must divide every width. [default: 128]"
    ),
    activations: str = typer.Option(
        "float",
        "--activations",
        help="float (weight-only: less memory) | int8 (int8 weights only: inputs quantized per token and "
        "int8 matrix products, which is faster; the stack part w8a8).",
    ),
    num_heads: NumHeads = None,
    as_json: Json = False,
) -> None:
    """Store a model's linear weights as int8 or int4: a smaller file, less memory; with int8
    activations also faster generation.

    The attention, FFN (experts), AdaLN and head weights are quantized; routers, selectors,
    embeddings and biases stay float. Every command runs the file; training and conversion refuse it.

    Examples: `actvar quantize tiny --weights int8 -o tiny-int8.safetensors` ·
    `actvar quantize tiny --weights int8 --activations int8 -o tiny-w8a8.safetensors` ·
    `actvar quantize actvar-d16.safetensors --weights int4 --group-size 64 -o actvar-d16-int4.safetensors`
    """
    from ..commands import quantize as cmd

    with handled():
        req = request(cmd.QuantizeRequest, ctx.params, source=checkpoint)
        result = execute(cmd.run, req, transient=True)

    def table(summary: dict) -> None:
        mib = 1024 * 1024
        rows = {
            "weights": summary["quantization"]["weights"],
            "group size": summary["quantization"]["group_size"] or "per output row",
            "activations": summary["quantization"].get("activations", "float"),
            "layers quantized": summary["layers"],
            "parameters": f"{summary['parameters']:,}",
            "size": f"{summary['input_bytes'] / mib:.1f} MiB -> {summary['output_bytes'] / mib:.1f} MiB",
            "bytes per parameter": f"{summary['bytes_per_parameter']:.3f}",
        }
        out.print(kv_table(f"quantized model written to {output}", rows))

    show(result, as_json, table)


@app.command()
def tune(
    base: str = typer.Argument(..., help="The dense VAR the stacks are made from (a file, an official name, or tiny)."),
    output: Path = typer.Option(..., "--out", help="Where to write the chosen model (.safetensors)."),
    ref: str = typer.Option(..., help="The yardstick: shapes, a folder, or an ADM .npz."),
    max_fid_ratio: float = typer.Option(1.5, help="The cap: FID at most this many times the dense model's."),
    objective: str = typer.Option("speedup", help="speedup (measured) or flops (saved)."),
    candidates: list[str] = typer.Option([], "--candidates", help="A distilled ActVAR model to try (repeatable)."),
    num: int = typer.Option(200, help="Samples per fully evaluated stack (FID, class accuracy)."),
    max_evals: int = typer.Option(12, help="Stacks that get the full yardstick."),
    time_limit: float = typer.Option(15.0, help="Minutes the search may take; it stops there, and resumes."),
    batch_size: int = typer.Option(8, help="Images per timed generation."),
    repeats: int = typer.Option(5, help="Timed runs per stack, interleaved with the dense model's."),
    seed: int = typer.Option(0, help="Seed of every sample the search makes."),
    vae: Vae = None,
    cache: Path | None = typer.Option(None, help="Where evaluated points are kept [ACTVAR_CACHE/tune]."),
    plot: Path | None = typer.Option(None, help="Write a PNG: measured speedup against FID, the front, the choice."),
    inception_weights: str | None = typer.Option(None, help="Inception weights file (ImageNet references)."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    as_json: Json = False,
) -> None:
    """Find the cheapest stack of methods whose FID stays within a cap, and write it as a model.

    Stacks of guidance off (cfg-sharp), a token rule, an expert rule, int8 products (w8a8) and scale
    skipping are ranked on a cheap signal (the speed their FLOPs and quantization promise, drift from
    the dense images); the promising ones get FID, class accuracy and measured speed.
    Evaluated points are cached: an interrupted search picks up where it stopped.

    Examples: `actvar tune tiny --ref shapes --max-fid-ratio 1.5 --out t.safetensors --json --plot front.png` ·
    `actvar tune d16 --vae vae --ref VIRTUAL_imagenet256_labeled.npz --inception-weights W.pth --num 5000
    --candidates runs/s2/model.safetensors --out tuned.safetensors`
    """
    from ..commands import tune as cmd
    from ..measure.tune import TuneSettings
    from .render import tune_report

    with handled():
        settings = TuneSettings(
            ref=ref, max_fid_ratio=max_fid_ratio, objective=objective, num=num, batch_size=batch_size,
            repeats=repeats, seed=seed, max_evals=max_evals, time_limit_s=time_limit * 60,
            inception_weights=inception_weights,
        )  # fmt: skip
        req = cmd.TuneRequest(base, output, settings, candidates, vae, cache, plot, device, dtype)
        result = execute(cmd.run, req)
    show(result, as_json, tune_report)
