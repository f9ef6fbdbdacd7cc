"""Training: the two distillation stages, and (hidden) the reference model itself."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, execute, handled, show
from .options import Config, Json, Overwrite, Vae
from .parsing import parse_set
from .render import distill_summary, kv_table, out

DISTILL_LOSS = {
    1: "Loss (supp. eq. 19): L_cls + sum over blocks of alpha (L_dis^w + L_dis^t) + beta (L_bl^w + L_bl^t).",
    2: "Loss (supp. eq. 22): L_cls + KL + mean over blocks of the hidden-state MSE, from the first scale the "
    "policy changes (KL direction: the recipe's stage2_kl). A model made with `moefy MODEL --method cfg-off:N` "
    "learns the guided teacher at its last N scales (guidance distillation).",
}
TRAINS = {1: "the routers and selectors", 2: "the recipe's deltas (delta_rank; 0: the experts, attention and head)"}


RECIPE_FLAGS = ("global_batch", "weight_decay", "alpha", "beta", "checkpoint_every", "seed", "precision")


def _distill(stage: int, args: dict) -> None:
    """Both stages' commands. Recipe keys come from the ``--set`` pairs, then the flags given over them."""
    from ..commands import distill as cmd

    as_json = args.pop("as_json")
    with handled():
        flags = {k: args.pop(k) for k in RECIPE_FLAGS} | {f"stage{stage}_lr": args.pop("lr")}
        settings = {**parse_set(args.pop("set_")), **{k: v for k, v in flags.items() if v is not None}}
        req = cmd.DistillRequest(stage, settings=settings, **args)
        result = execute(cmd.run, req)
    out_dir = Path(args["out_dir"])
    show(result, as_json, lambda s: distill_summary(s, f"stage {stage} done: {out_dir / 'model.safetensors'}"))


def _register(stage: int) -> None:
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
        set_: list[str] = typer.Option([], "--set", help="Any recipe key: --set KEY=VALUE (repeatable; flags win)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out-dir."),
        overwrite: Overwrite = False,
        device: str = typer.Option("auto", help="auto or cpu."),
        as_json: Json = False,
    ) -> None:
        _distill(stage, {k: v for k, v in locals().items() if k != "stage"})

    command.__doc__ = (
        f"Distillation stage {stage}: train {TRAINS[stage]}, everything else frozen.\n\n{DISTILL_LOSS[stage]}\n\n"
        f"Examples: `actvar distill-stage{stage} actvar-d16.safetensors --data /data/imagenet --cache-tokens tokens/ "
        f"--config d16 --out-dir runs/s{stage}` · `accelerate launch --multi_gpu --num_processes 8 -m actvar_cli "
        f"distill-stage{stage} ...` · `actvar distill-stage{stage} tiny-actvar.safetensors --max-steps 20 "
        f"--out-dir runs/tiny{stage}`"
    )
    app.command(f"distill-stage{stage}")(command)


_register(1)
_register(2)


@app.command("train-reference", hidden=True)
def train_reference(
    out_dir: Path = typer.Option(Path("runs/reference"), "--out", help="Checkpoints, weights and record.json."),
    install: bool = typer.Option(False, "--install", help="Copy the weights and record into the package."),
) -> None:
    """Train the built-in reference model from scratch (about 90 minutes on 2 CPU cores); resumable."""
    from ..commands import train_reference as cmd

    with handled():
        result = execute(cmd.run, cmd.TrainReferenceRequest(out_dir, install))
    show(result, False, lambda record: out.print(kv_table("reference model", record["quality"])))
