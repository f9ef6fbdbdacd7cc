"""Publishing an ActVAR model on the Hugging Face Hub: its folder (weights, config, card) and the upload."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import huggingface_hub as hf
from huggingface_hub import ModelCard, ModelCardData

from ..errors import CheckpointError, ConfigError, OutputError
from ..files import atomic_path, atomic_write_text, sha256_file
from ..models.checkpoint import CheckpointInfo, stored_json
from ..sparsity.flops import count_flops
from ..sparsity.methods import FAMILIES
from ..sparsity.stacks import quantization_part
from .download import MODEL_FILE, OFFICIAL_REPO, DownloadTarget, check_reachable, endpoint, hub_error, quiet_retries


def find_eval_json(model_path: str | os.PathLike, explicit: str | os.PathLike | None) -> dict | None:
    """The evaluation to show in the card: ``explicit``, else an eval.json beside the model."""
    path = Path(explicit) if explicit else Path(model_path).parent / "eval.json"
    if not path.exists():
        if explicit:
            raise ConfigError(f"--eval {path}: no such file")
        return None
    try:
        evals = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable eval.json", "give the eval.json that `actvar eval` wrote") from e
    if not isinstance(evals, dict):
        raise ConfigError(f"{path} is not an eval.json (not a mapping)", "give the eval.json that `actvar eval` wrote")
    return {k: v for k, v in evals.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def training_history(info: CheckpointInfo) -> list[dict]:
    """The training runs a model records (one per distillation stage)."""
    history = stored_json(info, "training") or []
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise CheckpointError(f"{info.source}: its training record is malformed", "push a file actvar wrote")
    return history


def check_folder_free(folder: Path, model_path: str | os.PathLike, overwrite: bool) -> None:
    """A push folder that holds another model's weights is not written over without ``--overwrite``."""
    existing = folder / MODEL_FILE
    if existing.exists() and not overwrite and sha256_file(existing) != sha256_file(model_path):
        raise OutputError(
            f"{folder} holds another model's {MODEL_FILE}", "choose another folder, or pass --overwrite to replace it"
        )


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _intro(summary: dict) -> str:
    base = f"`{summary['base_checkpoint']}` from [{OFFICIAL_REPO}](https://huggingface.co/{OFFICIAL_REPO})"
    if summary.get("method"):
        what = f"`{summary['base_checkpoint']}` made cheaper by the stack `{summary['method']}`"
        return f"A version of {base}, {what} (`actvar moefy --method`)."
    if summary["experts"]:
        return (
            f"An **ActVAR** version of {base}: every FFN is split into {summary['experts']} experts chosen per "
            "token by a router, and a gated token selector lets only the most useful tokens through each block "
            "at the largest scales (ActVAR, Zhang et al.)."
        )
    return f"A version of {base}."


def _card_text(repo_id: str, summary: dict, savings_rows: list[tuple], evals: dict | None, training: list) -> str:
    policy = summary["policy"] or {"scales": [], "token_rates": [], "weight_rates": []}
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        _intro(summary) + " It was made with [actvar](https://github.com/) and keeps the upstream VAR "
        "state-dict names.",
        "",
    ]
    if summary.get("method") or summary.get("quantization"):
        lines += ["## Method", "", "| part | what |", "|---|---|"]
        lines += [f"| `{part}` | {FAMILIES.get(part.split(':')[0], ('', ''))[1]} |" for part in summary["parts"]]
        lines += [""]
    lines += [
        "## Policy",
        "",
        "| scale | token rate | weight rate |",
        "|---|---|---|",
    ]
    lines += [
        f"| {s} | {t:g} | {w:g} |" for s, t, w in zip(policy["scales"], policy["token_rates"], policy["weight_rates"])
    ]
    lines += ["", "## Compute", "", "| | GFLOPs per image (CFG) |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in savings_rows]
    if training:
        lines += ["", "## Training", "", "| stage | steps | epochs | global batch | processes | data | final losses |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for t in training:
            final = t.get("final_losses") if isinstance(t.get("final_losses"), dict) else {}
            losses = ", ".join(f"{k} {_num(v, '.4g')}" for k, v in final.items() if k != "grad_norm")
            lines.append(
                f"| {t.get('stage')} | {t.get('steps')} | {_num(t.get('epochs', 0), '.3g')} | "
                f"{t.get('global_batch')} | {t.get('num_processes')} | {t.get('data')} | {losses} |"
            )
    if evals:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        for k in ("fid", "inception_score", "precision", "recall", "token_agreement", "logit_kl", "psnr_db"):
            if k in evals:
                lines.append(f"| {k} | {evals[k]:.4g} |")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "pip install actvar",
        f"actvar download {repo_id}",
        "actvar download vae",
        f"actvar sample {repo_id} --vae vae --classes 207,360,387,974 --out samples/",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_push_folder(
    model_path: str | os.PathLike, info: CheckpointInfo, *, repo_id: str, folder: str | os.PathLike, evals: dict | None
) -> Path:
    """The folder ``push`` uploads: model.safetensors, config.json and a model card (README.md)."""
    folder = Path(folder)
    training = training_history(info)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / MODEL_FILE
    if not (target.exists() and target.samefile(model_path)):  # never copied onto itself
        with atomic_path(target) as tmp:
            shutil.copyfile(model_path, tmp)
    cfg = info.var_config
    report = count_flops(cfg.replace(num_experts=0), info.policy, cfg.num_experts)
    method = info.metadata.get("method", "")
    parts = method.split("+") if method else []
    quant_part = quantization_part(info.quantization)
    if quant_part and quant_part not in parts:
        parts.append(quant_part)
    summary = {
        "base_checkpoint": info.metadata.get("base_checkpoint", ""),
        "experts": cfg.num_experts,
        "policy": info.policy.to_dict() if info.policy else None,
        "method": method,
        "parts": parts,
        "quantization": info.quantization,
    }
    config = {
        "format": "actvar",
        "var_config": cfg.to_dict(),
        "policy": summary["policy"],
        "method": method or None,
        "quantization": info.quantization,
        "experts": cfg.num_experts,
        "split": info.metadata.get("split"),
        "base_model": OFFICIAL_REPO,
        "base_checkpoint": summary["base_checkpoint"],
        "flops": {"dense": report.dense_flops, "actvar": report.sparse_flops, "savings": report.savings},
    }
    atomic_write_text(folder / "config.json", json.dumps(config, indent=1))
    rows = [
        ("dense VAR", f"{report.dense_flops / 1e9:.1f}"),
        ("ActVAR", f"{report.sparse_flops / 1e9:.1f}"),
        ("saved", f"{report.savings:.1%}"),
    ]
    data = ModelCardData(
        base_model=OFFICIAL_REPO,
        library_name="actvar",
        license="mit",
        tags=["actvar", "var", "image-generation", "mixture-of-experts", "imagenet", "class-conditional"],
        datasets=["ILSVRC/imagenet-1k"],
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + _card_text(repo_id, summary, rows, evals, training))
    atomic_write_text(folder / "README.md", str(card))
    return folder


def upload_folder(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create the repository (if needed) and upload the folder; returns the commit URL."""
    target = DownloadTarget(repo_id, None)
    api = hf.HfApi(endpoint=endpoint(), token=token, library_name="actvar")
    check_reachable(endpoint())
    try:
        with quiet_retries():
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload ActVAR model")
    except Exception as e:
        raise hub_error(e, target, None, action="upload") from e
    return str(getattr(info, "commit_url", info))
