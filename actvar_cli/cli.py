"""The ``actvar`` command line: parse options, call one library function, render the result."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__, render
from .arguments import parse_int_list, parse_set, policy_flags
from .arguments import request as args_to
from .errors import ActvarError, ConfigError
from .render import err, out

app = typer.Typer(
    name="actvar",
    help="Turn a pretrained VAR image generator into a cheaper ActVAR model, and use it.\n\n"
    "Try it at once on the built-in reference model: `actvar demo`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
STATE = {"debug": False}

# Options that several commands share, defined once.
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16.")]
Cfg = Annotated[float, typer.Option(help="Classifier-free guidance (ramped over scales, as upstream).")]
TopK = Annotated[int, typer.Option(help="Top-k sampling (0: off).")]
TopP = Annotated[float, typer.Option(help="Top-p sampling (0: off).")]
Seed = Annotated[int, typer.Option(help="Base seed; image i uses a generator seeded from (seed, i).")]
NumHeads = Annotated[int | None, typer.Option(help="Override the head count (default: depth).")]
Vae = Annotated[
    str | None, typer.Option(help="The VQVAE [the model's own (tiny for tiny), else the cached official one].")
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace what another run left in the output folder.")]
Scales = Annotated[str | None, typer.Option(help="1-based sparse scales, e.g. 9,10 [the model's or recipe's].")]
TokenRate = Annotated[float | None, typer.Option(help="Fraction of tokens kept on every sparse scale [0.75].")]
TokenRates = Annotated[str | None, typer.Option(help="Token rate per sparse scale, e.g. 0.5,0.75.")]
WeightRate = Annotated[float | None, typer.Option(help="Fraction of experts each kept token uses [0.75].")]
Config = Annotated[str | None, typer.Option("--config", help="Recipe YAML (or d16, tiny); flags override its keys.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile each scale's step (docs/benchmarks.md).")]


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


def resolve(spec: str) -> str:
    from .hub import resolve_local

    return resolve_local(spec)


# ---------------------------------------------------------------------------
# download / inspect / sample / random-weights
# ---------------------------------------------------------------------------


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
    from .hub import download_all

    with handled():
        results = download_all(names, revision, local_dir, force, offline)
    if as_json:
        return emit_json(results)
    for name, paths in results.items():
        for p in paths:
            out.print(f"[green]✓[/] {name}: {p}", highlight=False)


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
        report = inspect_checkpoint(resolve(checkpoint), num_heads=num_heads, with_hash=not no_hash)
    if as_json:
        return emit_json(report)
    render.inspect_report(report)


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
    from .sample_job import SampleRequest, sample_to_folder
    from .sampling import SamplingOptions

    with handled():
        opts = SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth)
        classes_list = parse_int_list(classes, "--classes") if classes else None
        request = args_to(SampleRequest, ctx.params, model=resolve(checkpoint), classes=classes_list, opts=opts)
        with render.progress_bars() as progress:
            summary = sample_to_folder(request, progress)
    if as_json:
        return emit_json(summary)
    render.sample_summary(summary)


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
    from .random_weights import write_random_weights

    with handled():
        summary = write_random_weights(arch, output, seed)
    if as_json:
        return emit_json(summary)
    out.print(f"[green]✓[/] {arch} with random weights (seed {seed}): {output}", highlight=False)


# ---------------------------------------------------------------------------
# moefy / flops / bench
# ---------------------------------------------------------------------------


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
    calib_images: int | None = typer.Option(None, help="Self-generated images to fit router/selector [8]; 0: weights."),
    config: Config = None,
    seed: int = typer.Option(0, help="Seed of calibration and clustering."),
    method: str | None = typer.Option(None, help="Another method's model: fixed-tokens:0.75, static-experts:0.75."),
    device: Device = "auto",
    num_heads: NumHeads = None,
    as_json: Json = False,
) -> None:
    """Convert a dense VAR into an ActVAR model: FFN experts, routers and token selectors.

    Without `--config` the recipe named for the model is used (`tiny`, `d16` …).

    Examples: `actvar moefy var_d16.pth --experts 16 -o actvar-d16.safetensors --vae vae_ch160v4096z32.pth` ·
    `actvar moefy tiny -o tiny-actvar.safetensors --token-rates 0.5,0.75 --weight-rate 0.5`
    """
    from .methods import MoefyRequest, moefy_command

    with handled():
        flags = policy_flags(scales, token_rate, token_rates, weight_rate)
        with render.progress_bars(transient=True) as progress:
            summary = moefy_command(
                args_to(MoefyRequest, ctx.params, source=resolve(checkpoint), policy_flags=flags), progress
            )
    if as_json:
        return emit_json(summary)
    if summary["router_init"] == "weight-statistics":
        err.print(
            "[yellow]note:[/] no VAE for calibration: router and selector start from weight statistics "
            "(pass --vae to fit them on self-generated tokens)"
        )
    out.print(render.kv_table(f"ActVAR model written to {output}", {k: v for k, v in summary.items() if k != "output"}))


@app.command()
def flops(
    model: str | None = typer.Argument(None, help="A VAR or ActVAR checkpoint (or give --arch)."),
    arch: str | None = typer.Option(None, help="dN (d12, d16 … d36) or tiny, instead of a checkpoint."),
    experts: int | None = typer.Option(None, "--experts", help="Experts per FFN [model's, or 16]."),
    scales: Scales = None,
    token_rate: TokenRate = None,
    token_rates: TokenRates = None,
    weight_rate: WeightRate = None,
    method: str | None = typer.Option(None, help="Another method's policy, e.g. fastvar:0.5 (docs/methods.md)."),
    paper_table: bool = typer.Option(False, "--paper-table", help="Our savings beside the paper's, for its settings."),
    as_json: Json = False,
) -> None:
    """FLOPs of generating one image (with CFG), dense vs ActVAR, per scale and per component.

    Examples: `actvar flops --arch d16` · `actvar flops actvar-d16.safetensors --json` ·
    `actvar flops --arch d20 --token-rates 0.5,0.25 --weight-rate 0.5` · `actvar flops --paper-table`
    """
    from . import flops as F

    with handled():
        if paper_table:
            rows = F.paper_table()
            return emit_json(rows) if as_json else render.paper_table(rows)
        flags = policy_flags(scales, token_rate, token_rates, weight_rate)
        data = F.flops_of(resolve(model) if model else None, arch, experts, **flags, method=method).to_dict()
    if as_json:
        return emit_json(data)
    render.flops_report(data)


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
    from .bench import SWEEP_ARCHS, SWEEP_BATCHES, BenchRequest, bench_command

    with handled():
        archs = list(SWEEP_ARCHS) if sweep else (arch.split(",") if arch else None)
        batches = list(SWEEP_BATCHES) if sweep else parse_int_list(batch_size, "--batch-size")
        paths = {k: resolve(v) if v else None for k, v in (("dense", dense), ("sparse", sparse), ("vae", vae))}
        request = args_to(BenchRequest, ctx.params, **paths, archs=archs, batch_sizes=batches)
        with render.progress_bars() as progress:
            result = bench_command(request, progress)
    if as_json:
        return emit_json(result)
    render.bench_result(result)


# ---------------------------------------------------------------------------
# distillation
# ---------------------------------------------------------------------------


DISTILL_LOSS = {
    1: "Loss (supp. eq. 19): L_cls + sum over blocks of alpha (L_dis^w + L_dis^t) + beta (L_bl^w + L_bl^t).",
    2: "Loss (supp. eq. 22): L_cls + KL(student || teacher) + mean over blocks of the hidden-state MSE.",
}
DISTILL_DOCS = {
    n: f"Distillation stage {n}: train the {'routers and selectors' if n == 1 else 'experts, attention and head'}, "
    f"everything else frozen.\n\n{DISTILL_LOSS[n]}\n\nExamples: `actvar distill-stage{n} actvar-d16.safetensors --data "
    f"/data/imagenet --cache-tokens tokens/ --config d16 --out-dir runs/s{n}` · `accelerate launch --multi_gpu "
    f"--num_processes 8 -m actvar_cli distill-stage{n} ...` · `actvar distill-stage{n} tiny-actvar.safetensors "
    f"--max-steps 20 --out-dir runs/tiny{n}`"
    for n in (1, 2)
}


def _distill_command(stage: int):
    epochs_default = "2" if stage == 1 else "10"

    def command(
        model: str = typer.Argument(
            ..., help="The ActVAR model (from moefy" + (")." if stage == 1 else " or stage 1).")
        ),
        out_dir: Path = typer.Option(..., "--out-dir", help="model.safetensors, metrics.jsonl, checkpoints."),
        teacher: str | None = typer.Option(None, help="The dense VAR [the base checkpoint named in the model]."),
        vae: Vae = None,
        data: str | None = typer.Option(None, help="teacher (data-free), shapes, an ImageFolder, or a token cache."),
        cache_tokens: Path | None = typer.Option(None, help="Encode an ImageFolder once, into this folder."),
        config: Config = None,
        epochs: float | None = typer.Option(None, help=f"Epochs of this stage [recipe: {epochs_default}]."),
        max_steps: int | None = typer.Option(None, help="Stop after this many optimizer steps (short runs)."),
        batch_size: int = typer.Option(8, help="Images per process and micro-step (accumulation does the rest)."),
        global_batch: int | None = typer.Option(None, help="Images per optimizer step [recipe: 512]."),
        lr: float | None = typer.Option(None, help="Peak learning rate of this stage [recipe: 2e-4]."),
        weight_decay: float | None = typer.Option(None, help="AdamW weight decay [recipe: 0.05]."),
        alpha: float | None = typer.Option(None, help="Stage 1 distillation weight [recipe: 0.05]."),
        beta: float | None = typer.Option(None, help="Stage 1 load-balancing weight [recipe: 0.01]."),
        checkpoint_every: int | None = typer.Option(None, help="Steps between checkpoints [recipe: 500]."),
        seed: int | None = typer.Option(None, help="Seed of data order, dropout and teacher sampling [recipe: 0]."),
        precision: str | None = typer.Option(None, help="auto, fp32 or bf16 [recipe: auto]."),
        set_: list[str] = typer.Option([], "--set", help="Any other recipe key: --set KEY=VALUE (repeatable)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out-dir."),
        overwrite: Overwrite = False,
        device: str = typer.Option("auto", help="auto or cpu."),
        as_json: Json = False,
    ) -> None:
        from .distill import distill_command

        with handled():
            overrides = {
                **parse_set(set_),
                f"stage{stage}_lr": lr,
                "global_batch": global_batch,
                "weight_decay": weight_decay,
                "alpha": alpha,
                "beta": beta,
                "checkpoint_every": checkpoint_every,
                "seed": seed,
                "precision": precision,
            }
            with render.progress_bars() as progress:
                summary = distill_command(
                    stage,
                    model,
                    out_dir,
                    config,
                    overrides,
                    vae,
                    teacher,
                    data,
                    cache_tokens,
                    batch_size,
                    epochs,
                    max_steps,
                    resume,
                    overwrite,
                    device,
                    progress,
                )
        if as_json:
            return emit_json(summary)
        render.distill_summary(summary, f"stage {stage} done: {out_dir / 'model.safetensors'}")

    command.__doc__ = DISTILL_DOCS[stage]
    return command


app.command("distill-stage1")(_distill_command(1))
app.command("distill-stage2")(_distill_command(2))


# ---------------------------------------------------------------------------
# eval / push / demo / train-reference
# ---------------------------------------------------------------------------


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
    from .evaluate import EvalJob, default_out_dir, run_eval
    from .sampling import SamplingOptions

    with handled():
        opts = SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p)
        classes_list = parse_int_list(classes, "--classes") if classes else None
        out = out_dir or default_out_dir(model)
        job = args_to(EvalJob, ctx.params, model=resolve(model), out_dir=out, classes=classes_list, opts=opts)
        with render.progress_bars() as progress:
            results = run_eval(job, progress)
    if results is None:  # not the main process
        return
    if as_json:
        return emit_json(results)
    render.eval_results(results)


@app.command()
def push(
    model: Path = typer.Argument(..., help="The ActVAR model.safetensors to publish."),
    repo: str = typer.Option(..., "--repo", help="USER/NAME on the Hub."),
    private: bool = typer.Option(False, "--private", help="Create a private repository."),
    dry_run: Path | None = typer.Option(None, "--dry-run", help="Write the folder here instead of uploading."),
    eval_json: Path | None = typer.Option(None, "--eval", help="eval.json to show in the card [found next to MODEL]."),
    token: str | None = typer.Option(None, help="Hub token [HF_TOKEN or the saved login]."),
    as_json: Json = False,
) -> None:
    """Publish a model to the Hub: model.safetensors, config.json and a model card.

    Examples: `actvar push runs/s2/model.safetensors --repo me/actvar-d16` ·
    `actvar push runs/s2/model.safetensors --repo me/actvar-d16 --dry-run card/`
    """
    from .hub import push_command

    with handled():
        result = push_command(model, repo, private, dry_run, eval_json, token)
    if as_json:
        return emit_json(result)
    where = (
        f"wrote {', '.join(result['files'])} to {result['folder']}" if dry_run else f"pushed to {repo}: {result['url']}"
    )
    out.print(f"[green]✓[/] {where}", highlight=False)


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
    from .demo import DemoSettings, run_demo

    with handled():
        if stage1_steps < 1 or stage2_steps < 1:
            raise ConfigError("--stage1-steps and --stage2-steps must be at least 1")
        settings = DemoSettings(stage1_steps=stage1_steps, stage2_steps=stage2_steps)
        with render.progress_bars() as progress:
            summary = run_demo(out_dir, settings, step=lambda m: err.print(f"[bold]{m}"), progress=progress)
    if as_json:
        return emit_json(summary)
    render.demo_summary(summary)


@app.command()
def compare(
    ctx: typer.Context,
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
    fastvar[:ratio], dmoe[:tau], skip-last[:N], cfg-off[:N], ear[:rate] (docs/methods.md).

    Example: `actvar compare tiny --methods fastvar,dmoe,skip-last,static-experts,fixed-tokens --ref shapes
    --num 64 --json --plot p.png`
    """
    from .compare import CompareJob, run_compare

    with handled():
        specs = [m for m in methods.split(",") if m.strip()]
        job = args_to(CompareJob, ctx.params, base=resolve(base), methods=specs)
        with render.progress_bars() as progress:
            result = run_compare(job, progress)
    if as_json:
        return emit_json(result)
    render.compare_table(result)


@app.command("train-reference", hidden=True)
def train_reference(
    out_dir: Path = typer.Option(Path("runs/reference"), "--out", help="Checkpoints, weights and record.json."),
    install: bool = typer.Option(False, "--install", help="Copy the weights and record into the package."),
) -> None:
    """Train the built-in reference model from scratch (about 90 minutes on 2 CPU cores); resumable."""
    from .reference import install_weights
    from .reference import train_reference as train

    with handled():
        with render.progress_bars() as progress:
            record = train(out_dir, progress=progress)
        if install:
            install_weights(out_dir)
    out.print(render.kv_table("reference model", record["quality"]))


def main() -> None:
    app()
