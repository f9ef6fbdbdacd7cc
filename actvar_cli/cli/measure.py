"""Measuring: FLOPs, speed, quality and agreement, every method side by side, and the demo."""

from __future__ import annotations

from pathlib import Path

import typer

from . import render
from .app import app, execute, handled, show
from .options import (
    Cfg,
    Compile,
    Device,
    Dtype,
    Json,
    Overwrite,
    Scales,
    Seed,
    TokenRate,
    TokenRates,
    TopK,
    TopP,
    Vae,
    WeightRate,
)
from .parsing import parse_int_list, policy_flags, request


@app.command()
def flops(
    model: str | None = typer.Argument(None, help="A VAR or ActVAR checkpoint (or give --arch)."),
    arch: str | None = typer.Option(None, help="dN (d12, d16 … d36) or tiny, instead of a checkpoint."),
    experts: int | None = typer.Option(None, "--experts", help="Experts per FFN [model's, or 16]."),
    scales: Scales = None,
    token_rate: TokenRate = None,
    token_rates: TokenRates = None,
    weight_rate: WeightRate = None,
    method: str | None = typer.Option(None, help="Another method's policy, e.g. fastvar:0.5 (docs/other-methods.md)."),
    paper_table: bool = typer.Option(False, "--paper-table", help="Our savings beside the paper's, for its settings."),
    as_json: Json = False,
) -> None:
    """FLOPs of generating one image (with CFG), dense vs ActVAR, per scale and per component.

    Examples: `actvar flops --arch d16` · `actvar flops actvar-d16.safetensors --json` ·
    `actvar flops --arch d20 --token-rates 0.5,0.25 --weight-rate 0.5` · `actvar flops --paper-table`
    """
    from ..commands import flops as cmd

    with handled():
        flags = policy_flags(scales, token_rate, token_rates, weight_rate)
        req = cmd.FlopsRequest(model, arch, experts, flags, method=method, paper_table=paper_table)
        result = execute(cmd.run, req, progress=False)
    show(result, as_json, render.paper_table if paper_table else render.flops_report)


@app.command()
def bench(
    ctx: typer.Context,
    dense: str | None = typer.Argument(None, help="The dense VAR (or give --arch)."),
    sparse: str | None = typer.Argument(None, help="The ActVAR model converted from it."),
    arch: str | None = typer.Option(None, help="Random-weight models of these architectures, e.g. d12,d16,tiny."),
    vae: str | None = typer.Option(None, help="VQVAE for the decode timing (default: random weights of its shape)."),
    batch_size: str = typer.Option("8", help="Images per generation, or several: 1,4,8 (a sweep)."),
    sweep: bool = typer.Option(False, "--sweep", help="tiny, d12, d16 and d20 at batch 1, 4 and 8."),
    breakdown: bool = typer.Option(False, "--breakdown", help="Time per component and per scale, beside FLOPs shares."),
    by_scale: bool = typer.Option(False, "--by-scale", help="Time per scale beside its FLOPs ratio (no profiler run)."),
    plot: Path | None = typer.Option(None, help="Write a PNG of the time per scale (with --by-scale)."),
    repeats: int = typer.Option(5, help="Timed runs per model, interleaved; speedup = median of run-by-run ratios."),
    warmup: int = typer.Option(1, help="Untimed runs per model first."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: int = typer.Option(0, help="Seed of the per-image generators."),
    compile: Compile = False,
    as_json: Json = False,
) -> None:
    """Measured speed of dense vs ActVAR generation, beside the FLOPs' ideal speedup.

    Examples: `actvar bench var_d16.pth actvar-d16.safetensors --vae vae_ch160v4096z32.pth` ·
    `actvar bench --arch d16 --batch-size 8 --json` (random weights: timing does not depend on them) ·
    `actvar bench --sweep --by-scale --repeats 5` · `actvar bench --arch tiny --by-scale --plot scales.png`
    """
    from ..commands import bench as cmd

    with handled():
        archs = list(cmd.SWEEP_ARCHS) if sweep else (arch.split(",") if arch else None)
        batches = list(cmd.SWEEP_BATCHES) if sweep else parse_int_list(batch_size, "--batch-size")
        req = request(cmd.BenchRequest, ctx.params, archs=archs, batch_sizes=batches)
        result = execute(cmd.run, req)
    show(result, as_json, render.bench_result)


@app.command("eval")
def eval_(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="The model to evaluate (ActVAR or dense VAR)."),
    vae: Vae = None,
    fid: bool = typer.Option(False, "--fid", help="Frechet distance against --ref."),
    isc: bool = typer.Option(False, "--is", help="Inception Score (class score with --ref shapes)."),
    prc: bool = typer.Option(False, "--prc", help="Precision and recall against --ref."),
    ref: str | None = typer.Option(None, help="shapes (the reference model's set), a folder, or an ADM batch .npz."),
    teacher: str | None = typer.Option(None, help="Compare with this dense model ('auto': the model's base)."),
    num: int | None = typer.Option(None, help="Images to sample [50 per class], and teacher pyramids [32]."),
    psnr_images: int | None = typer.Option(None, help="Image pairs for the PSNR, at most --num [= --num]."),
    classes: str | None = typer.Option(None, help="Classes to sample, evenly [all of the model's]."),
    cfg: Cfg = 1.5,
    top_k: TopK = 900,
    top_p: TopP = 0.96,
    seed: Seed = 0,
    batch_size: int = typer.Option(16, help="Images per forward pass."),
    out_dir: Path | None = typer.Option(None, "--out", help="Where samples and eval.json go [eval-<model>/]."),
    inception_weights: str | None = typer.Option(None, help="Inception weights file (auto: download it)."),
    dense: bool = typer.Option(False, "--dense", help="Every token and expert active."),
    overwrite: Overwrite = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    compile: Compile = False,
    as_json: Json = False,
) -> None:
    """Score a model: FID / IS / precision-recall (and class accuracy on shapes), and agreement with the dense teacher.

    Examples: `actvar eval tiny --fid --is --prc --ref shapes --num 200 --json` ·
    `actvar eval actvar-d16.safetensors --vae vae --fid --is --prc --ref VIRTUAL_imagenet256_labeled.npz
    --inception-weights weights-inception-2015-12-05-6726825d.pth` ·
    `actvar eval runs/s2/model.safetensors --teacher auto --num 64 --json` ·
    `accelerate launch --multi_gpu --num_processes 8 -m actvar_cli eval ... --fid --ref ...` (sharded sampling)
    """
    from ..commands import evaluate as cmd
    from ..generation.sampling import SamplingOptions

    with handled():
        opts = SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p)
        classes_list = parse_int_list(classes, "--classes") if classes else None
        req = request(cmd.EvalRequest, ctx.params, classes=classes_list, opts=opts)
        result = execute(cmd.run, req)
    show(result, as_json, render.eval_results)


@app.command()
def compare(
    base: str = typer.Argument(
        ..., help="The dense VAR the methods are made from (a file, an official name, or tiny)."
    ),
    methods: str = typer.Option(
        "fastvar,dmoe,skip-last,static-experts,fixed-tokens",
        help="Comma-separated methods, e.g. fastvar:0.5,actvar:PATH.",
    ),
    vae: Vae = None,
    ref: str | None = typer.Option(None, help="Quality against it: shapes, a folder, or an ADM .npz."),
    num: int = typer.Option(64, help="Samples per method for FID, IS and class accuracy."),
    batch_size: int = typer.Option(8, help="Images per timed generation."),
    repeats: int = typer.Option(3, help="Timed runs per method, interleaved; speedup = median of ratios to dense."),
    seed: Seed = 0,
    plot: Path | None = typer.Option(None, help="Write a PNG: quality against time and FLOPs, Pareto front marked."),
    inception_weights: str | None = typer.Option(None, help="Inception weights file (ImageNet references)."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    as_json: Json = False,
) -> None:
    """Every way to make a VAR cheaper on one yardstick: FLOPs, measured speed, agreement, quality.

    Methods: dense, actvar[:PATH], actvar-tokens, actvar-experts, static-experts[:rate], fixed-tokens[:rate],
    fastvar[:ratio], dmoe[:tau], skip-last[:N], cfg-off[:N], cfg-sharp[:N], ear[:rate] (docs/other-methods.md).
    Stack them with +, and add skipped-kv, skipped-update, int8, int4, w8a8 or kv-int8: cfg-sharp:2+w8a8.

    Example: `actvar compare tiny --methods fastvar,dmoe,skip-last,static-experts,fixed-tokens --ref shapes
    --num 64 --json --plot p.png`
    """
    from ..commands import compare as cmd
    from ..measure.compare import CompareSettings

    with handled():
        settings = CompareSettings(
            ref=ref, num=num, batch_size=batch_size, repeats=repeats, seed=seed, inception_weights=inception_weights
        )
        specs = [m for m in methods.split(",") if m.strip()]
        req = cmd.CompareRequest(base, specs, vae=vae, settings=settings, device=device, dtype=dtype, plot=plot)
        result = execute(cmd.run, req)
    show(result, as_json, render.compare_table)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("actvar-demo"), "--out", help="Where everything goes."),
    stage1_steps: int = typer.Option(40, help="Optimizer steps of stage 1."),
    stage2_steps: int = typer.Option(60, help="Optimizer steps of stage 2."),
    as_json: Json = False,
) -> None:
    """The whole job on the built-in reference model, in a few minutes on a CPU.

    moefy -> stage 1 -> stage 2 -> dense / converted / distilled measured side by side (class
    accuracy, FID, agreement with the dense model) -> compare.png -> FLOPs and speed.
    Example: `actvar demo --out demo/`
    """
    from ..commands import demo as cmd

    with handled():
        announce = lambda m: render.err.print(f"[bold]{render.escape(m)}")  # noqa: E731
        req = cmd.DemoRequest(out_dir, stage1_steps, stage2_steps, announce=announce)
        result = execute(cmd.run, req)
    show(result, as_json, render.demo_summary)


@app.command()
def memory(
    model: str | None = typer.Argument(None, help="A VAR, ActVAR or stacked model file (or give --arch)."),
    arch: str | None = typer.Option(None, help="dN (d16 … d36) or tiny, instead of a checkpoint."),
    batch_size: int = typer.Option(8, help="Images per generation (per process and micro-step with --train)."),
    method: str | None = typer.Option(None, help="A method or stack it runs with, e.g. actvar+int8+kv-int8."),
    dtype: str = typer.Option("fp32", help="Activations: fp32, bf16 or fp16 (autocast)."),
    train: str | None = typer.Option(None, help="stage1 or stage2: plan a distillation stage instead."),
    experts: int = typer.Option(16, "--experts", help="Experts per FFN when the stack converts the model."),
    shard: int = typer.Option(1, help="With --train: FSDP full sharding over this many processes."),
    device: str = typer.Option("cuda", help="cuda (fused attention keeps no score matrix) or cpu (it does)."),
    as_json: Json = False,
) -> None:
    """What generation (or a distillation stage) needs in memory, in GB per component, before running it.

    Examples: `actvar memory --arch d30 --batch-size 64 --dtype bf16 --json` ·
    `actvar memory --arch d30 --batch-size 64 --method actvar+int8+kv-int8 --dtype bf16` ·
    `actvar memory --arch d36 --train stage2 --batch-size 32 --dtype bf16 --shard 8`
    """
    from ..commands import memory as cmd

    with handled():
        req = cmd.MemoryRequest(model, arch, batch_size, method, dtype, train, experts, shard, device)
        result = execute(cmd.run, req, progress=False)
    show(result, as_json, render.memory_plan)
