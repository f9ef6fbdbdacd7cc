"""Options that several commands share, defined once."""

from __future__ import annotations

from typing import Annotated

import typer

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
