"""The Markdown table of docs/quality.md from the JSON files of scripts/quality-study.sh.

Usage: python scripts/quality_table.py runs/quality
"""

import json
import sys
from pathlib import Path

POLICIES = ("default", "equal-flops", "corner")
ROWS = [("dense", "dense")] + [
    (f"{policy}-{stage}", f"{policy}: {stage}") for policy in POLICIES for stage in ("converted", "stage1", "stage2")
]


def cell(r: dict, key: str, fmt: str) -> str:
    return "" if r.get(key) is None else format(r[key], fmt)


def dense_scales(r: dict) -> str:
    """The lowest token agreement over the scales outside the policy."""
    dense = [s["token_agreement"] for s in r.get("per_scale", []) if not s["sparse"]]
    return format(min(dense), ".4f") if dense else ""


def table(folder: Path) -> None:
    print(
        "| model | FLOPs saved | class accuracy | FID | IS | dense scales: agreement (min) "
        "| sparse scales: agreement | sparse scales: KL | PSNR to dense (dB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label in ROWS:
        path = folder / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        saved = r["flops"]["savings"] if "flops" in r else None
        print(
            f"| {label} | {'' if saved is None else format(saved, '.1%')} | {cell(r, 'class_accuracy', '.1%')} "
            f"| {cell(r, 'fid', '.2f')} | {cell(r, 'inception_score', '.2f')} | {dense_scales(r)} "
            f"| {cell(r, 'token_agreement', '.3f')} | {cell(r, 'logit_kl', '.3f')} | {cell(r, 'psnr_db', '.1f')} |"
        )


if __name__ == "__main__":
    table(Path(sys.argv[1]))
