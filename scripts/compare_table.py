"""A Markdown table for docs/comparison.md from `actvar compare --json` output.

Usage: python scripts/compare_table.py runs/comparison/distilled.json
"""

import json
import sys


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "" if value is None else format(value, fmt)


def table(path: str) -> None:
    r = json.load(open(path))
    where = f"{r['device']} {r['dtype']}"
    print(f"{r['num']} samples per method on `{r['ref']}`; timing at batch {r['batch_size']}, {where}\n")
    print("| method | FLOPs saved | speedup | class accuracy | FID | token agreement | KL to dense |")
    print("|---|---|---|---|---|---|---|")
    for row in r["methods"]:
        name = row["method"].replace("|", "/")
        print(
            f"| {name} | {row['flops_savings']:.1%} | {row['speedup']:.2f}x | {cell(row, 'class_accuracy', '.1%')} "
            f"| {cell(row, 'fid', '.2f')} | {cell(row, 'token_agreement', '.3f')} | {cell(row, 'kl', '.4f')} |"
        )


if __name__ == "__main__":
    for p in sys.argv[1:]:
        table(p)
