"""The Markdown table of docs/quality.md from the JSON files of scripts/quality-study.sh.

Usage: python scripts/quality_table.py runs/quality
"""

import json
import sys
from pathlib import Path

ROWS = [("dense", "dense")] + [
    (f"{policy}-{stage}", f"{policy}: {stage}")
    for policy in ("default", "aggressive")
    for stage in ("converted", "stage1", "stage2")
]


def cell(r: dict, key: str, fmt: str) -> str:
    return "" if r.get(key) is None else format(r[key], fmt)


def table(folder: Path) -> None:
    print("| model | class accuracy | FID | IS | token agreement | KL to dense |")
    print("|---|---|---|---|---|---|")
    for name, label in ROWS:
        path = folder / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        print(
            f"| {label} | {cell(r, 'class_accuracy', '.1%')} | {cell(r, 'fid', '.2f')} "
            f"| {cell(r, 'inception_score', '.2f')} | {cell(r, 'token_agreement', '.3f')} "
            f"| {cell(r, 'logit_kl', '.3f')} |"
        )


if __name__ == "__main__":
    table(Path(sys.argv[1]))
