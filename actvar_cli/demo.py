"""``demo``: the whole job on the built-in tiny model, in a few minutes on a CPU.

moefy -> agreement with the teacher before training -> stage 1 -> stage 2 -> agreement
after -> a sample grid -> FLOPs -> a speed benchmark; everything lands in one folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .bench import bench
from .checkpoint import BUILTIN_TINY, atomic_write_text, load_vae, load_var, save_model
from .conversion import MoefyOptions, moefy
from .distill import DistillJob, run_distillation
from .flops import count_flops
from .metrics import routing_agreement, teacher_agreement
from .recipes import load_recipe
from .sample_job import SampleJob, finish_outputs, run_sample_job
from .sampling import SamplingOptions

Step = Callable[[str], None]  # announces each step
Progress = Callable[[str, int, int], None]


def run_demo(
    out_dir: str | Path,
    stage1_steps: int = 30,
    stage2_steps: int = 40,
    batch_size: int = 8,
    eval_num: int = 16,
    bench_repeats: int = 3,
    step: Step | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = step or (lambda _: None)
    cpu = torch.device("cpu")
    recipe = load_recipe("tiny")
    teacher, _ = load_var(BUILTIN_TINY)
    vae, _ = load_vae(BUILTIN_TINY)

    say("1/7 moefy: 16 experts per FFN, router and selector fitted on 8 self-generated images")
    dense, _ = load_var(BUILTIN_TINY)
    converted, report = moefy(dense, vae, MoefyOptions(policy=recipe.policy(), calib_images=recipe.calib_images))
    actvar_path = out / "tiny-actvar.safetensors"
    save_model(
        converted,
        actvar_path,
        {
            "base_checkpoint": BUILTIN_TINY,
            "base_checkpoint_path": BUILTIN_TINY,
            "base_sha256": "",
            "experts": 16,
            "split": "cluster",
            "router_init": report.router_init,
            "vae": BUILTIN_TINY,
        },
    )

    say("2/7 agreement with the teacher before training")
    held_out = SamplingOptions(cfg=recipe.teacher_cfg)  # pyramids drawn as the training ones are
    before = teacher_agreement(
        converted, teacher, vae, eval_num, batch_size, opts=held_out, psnr_images=8, progress=progress
    )
    routing_before = routing_agreement(converted, teacher, vae, eval_num, batch_size)

    def stage(n: int, model: Path, steps: int) -> dict[str, Any]:
        def on_step(ev: dict[str, Any]) -> None:
            if progress and ev.get("event") == "step":
                progress(f"stage {n}", ev["step"], ev["total_steps"])

        job = DistillJob(stage=n, model=str(model), out_dir=out / f"stage{n}", recipe=recipe,
                         batch_size=batch_size, max_steps=steps)  # fmt: skip
        return run_distillation(job, on_step)

    say(f"3/7 stage 1: routers and selectors, {stage1_steps} steps")
    s1 = stage(1, actvar_path, stage1_steps)
    say(f"4/7 stage 2: experts, attention and head, {stage2_steps} steps")
    s2 = stage(2, out / "stage1" / "model.safetensors", stage2_steps)
    final, _ = load_var(out / "stage2" / "model.safetensors")

    say("5/7 agreement with the teacher after training")
    after = teacher_agreement(
        final, teacher, vae, eval_num, batch_size, opts=held_out, psnr_images=8, progress=progress
    )
    routing_after = routing_agreement(
        load_var(out / "stage1" / "model.safetensors")[0], teacher, vae, eval_num, batch_size
    )

    say("6/7 a sample grid from the distilled model")
    job = SampleJob(classes=[980, 437, 22, 562, 207, 360, 387, 974], num_per_class=1, seed=0, batch_size=batch_size)
    run_sample_job(final, vae, job, out / "samples", cpu, policy=final.policy)
    grid, _ = finish_outputs(job, out / "samples", npz=False)

    say("7/7 FLOPs and a speed benchmark (dense vs ActVAR)")
    flops = count_flops(final.cfg.replace(num_experts=0), final.policy, final.cfg.num_experts)
    speed = bench(teacher, final, vae, cpu, "fp32", batch_size=batch_size, repeats=bench_repeats, warmup=1)

    summary = {
        "model": str(out / "stage2" / "model.safetensors"),
        "grid": str(grid),
        "flops_savings": flops.savings,
        "ideal_speedup": flops.dense_flops / flops.sparse_flops,
        "measured_speedup": speed["speedup"],
        "measured_speedup_end_to_end": speed["speedup_end_to_end"],
        "token_agreement_before": before["token_agreement"],
        "token_agreement_after": after["token_agreement"],
        "logit_kl_before": before["logit_kl"],
        "logit_kl_after": after["logit_kl"],
        "psnr_db_before": before["psnr_db"],
        "psnr_db_after": after["psnr_db"],
        "router_agreement_before": routing_before["router_agreement"],
        "router_agreement_after_stage1": routing_after["router_agreement"],
        "selector_agreement_before": routing_before["selector_agreement"],
        "selector_agreement_after_stage1": routing_after["selector_agreement"],
        "stage1_samples_per_s": s1["samples_per_s"],
        "stage2_samples_per_s": s2["samples_per_s"],
        "note": (
            "The tiny model has random weights and 128-wide layers: the numbers show that the pipeline works, "
            "not image quality. Its layers are too small for sparsity to beat per-operation overhead; "
            "`actvar bench --arch d16` measures a d16-sized model (docs/benchmarks.md). "
            "PSNR between images of a random model says little: one different early token changes the whole picture."
        ),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary
