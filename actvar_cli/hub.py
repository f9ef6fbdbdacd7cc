"""The Hugging Face Hub: fetching official VAR weights and actvar models, publishing ours.

All traffic goes through ``huggingface_hub`` (so ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_OFFLINE`` and tokens behave as everywhere else); downloads land in the Hub cache
or ``--local-dir``, resume when interrupted, and come from the cache when offline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import BUILTIN_NAME
from .errors import ActvarError, CheckpointError, ConfigError, HubError

OFFICIAL_REPO = "FoundationVision/var"
OFFICIAL_FILES = {
    "d16": "var_d16.pth",
    "d20": "var_d20.pth",
    "d24": "var_d24.pth",
    "d30": "var_d30.pth",
    "d36": "var_d36.pth",
    "vae": "vae_ch160v4096z32.pth",
}
MODEL_FILE = "model.safetensors"
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # the Hub's rules


@dataclass(frozen=True)
class DownloadTarget:
    repo_id: str
    filename: str | None  # None: the whole repository

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.filename}" if self.filename else self.repo_id


def parse_target(spec: str) -> DownloadTarget:
    """``d16`` .. ``d36``, ``vae``, ``REPO_ID`` or ``REPO_ID:FILE``."""
    key = spec.strip()
    if key.lower() in OFFICIAL_FILES:
        return DownloadTarget(OFFICIAL_REPO, OFFICIAL_FILES[key.lower()])
    if key.lower().removeprefix("var_") in OFFICIAL_FILES:
        return DownloadTarget(OFFICIAL_REPO, OFFICIAL_FILES[key.lower().removeprefix("var_")])
    repo, _, filename = key.partition(":")
    if not REPO_ID.fullmatch(repo) or ".." in repo or repo.endswith((".", "-")):
        raise HubError(
            f"{spec!r} is not a model name or a repository id",
            "use d16, d20, d24, d30, d36, vae, USER/NAME or USER/NAME:FILE",
        )
    return DownloadTarget(repo, filename or None)


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str | None:
    """``HF_ENDPOINT`` as set now (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def cache_dir() -> str | None:
    """``HF_HUB_CACHE`` or ``HF_HOME``/hub as set now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _hub_error(e: Exception, target: DownloadTarget, revision: str | None, action: str = "fetch") -> HubError:
    """huggingface_hub's typed errors as one line that says what to do; ``action`` is fetch or upload."""
    from huggingface_hub import errors as hf_errors

    rev = revision or "main"
    if isinstance(e, hf_errors.GatedRepoError):
        return HubError(f"{target.repo_id} is gated", "accept its terms on the Hub and log in (hf auth login)")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return HubError(f"repository {target.repo_id} was not found (or is private)", "check the name, or log in")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return HubError(f"revision {rev!r} does not exist in {target.repo_id}", "check --revision")
    if isinstance(e, hf_errors.LocalEntryNotFoundError):  # a subclass of EntryNotFoundError: test it first
        if is_offline():
            return HubError(f"{target} is not in the local cache, and HF_HUB_OFFLINE is set", "unset it to download")
        return HubError(f"{target} is not in the local cache", f"run `actvar download {target}` with network access")
    if isinstance(e, hf_errors.EntryNotFoundError):
        return HubError(f"{target.filename} is not in {target.repo_id}@{rev}", "check the file name")
    if isinstance(e, hf_errors.HfHubHTTPError):
        return HubError(
            f"the Hub refused to {action} {target}: {str(e).splitlines()[0]}", "check the name and your token"
        )
    if isinstance(e, OSError):
        return HubError(f"could not {action} {target}: {e}", "check the network, disk space and --local-dir")
    return HubError(f"could not {action} {target}: {e}")


def check_reachable(url: str | None, timeout: float = 5.0) -> None:
    """Fail at once, not after half a minute of retries, when the Hub's host refuses connections."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return  # a proxy decides what is reachable
    parsed = urlparse(url or "https://huggingface.co")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise HubError(
            f"cannot reach the Hub at {parsed.scheme}://{parsed.netloc} ({reason})",
            "check the network and HF_ENDPOINT, or use --offline for files already in the cache",
        ) from e


@contextlib.contextmanager
def quiet_retries():
    """huggingface_hub logs every retry as a warning; the final error says what went wrong."""
    hf_logger = logging.getLogger("huggingface_hub")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logger.setLevel(level)


def download(
    spec: str,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    force: bool = False,
    offline: bool = False,
    tqdm_class=None,
) -> list[Path]:
    """Fetch one file (or a whole repository) and return the local paths."""
    import huggingface_hub as hf

    target = parse_target(spec)
    common = dict(
        revision=revision,
        endpoint=endpoint(),
        cache_dir=cache_dir(),
        local_dir=local_dir,
        force_download=force,
        local_files_only=offline or is_offline(),
        library_name="actvar",
        tqdm_class=tqdm_class,
    )
    if not common["local_files_only"]:
        check_reachable(endpoint())
    try:
        with quiet_retries():
            if target.filename:
                return [Path(hf.hf_hub_download(target.repo_id, target.filename, **common))]
            root = Path(hf.snapshot_download(target.repo_id, **common))
    except Exception as e:
        raise _hub_error(e, target, revision) from e
    return sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)


def download_all(names: list[str], revision: str | None, local_dir, force: bool, offline: bool) -> dict[str, list[str]]:
    """Every name checked first, then each downloaded: {name: local paths}."""
    for name in names:
        parse_target(name)
    return {name: [str(p) for p in download(name, revision, local_dir, force, offline)] for name in names}


def model_file_in(paths: list[Path]) -> Path | None:
    """The weights file among a downloaded repository's files."""
    for p in paths:
        if p.name == MODEL_FILE:
            return p
    weights = [p for p in paths if p.suffix in (".safetensors", ".pth")]
    return weights[0] if len(weights) == 1 else None


def find_teacher(metadata: Mapping[str, str], explicit: str | None) -> str:
    """--teacher, else the base checkpoint an ActVAR model names (its path, or its official name
    in the Hub cache), checked against the sha256 the model recorded of it."""
    if explicit:
        return resolve_local(explicit)
    path = metadata.get("base_checkpoint_path")
    official = metadata.get("base_checkpoint", "").removesuffix(".pth").removeprefix("var_")
    if path and (path == BUILTIN_NAME or Path(path).exists()):
        found = path
    elif official:
        found = resolve_local(official)
    else:
        raise ConfigError("the model names no base checkpoint to use as teacher", "pass --teacher var_d16.pth")
    check_base_hash(found, metadata.get("base_sha256", ""))
    return found


def check_base_hash(path: str, recorded: str) -> None:
    """A teacher found by name must be the very file the model was converted from."""
    from .checkpoint import sha256_file

    if path == BUILTIN_NAME or not recorded:
        return
    actual = sha256_file(path)
    if actual != recorded:
        raise CheckpointError(
            f"{path} is not the base model this ActVAR model was made from (sha256 {actual[:12]}…, "
            f"the model records {recorded[:12]}…)",
            "pass the right dense model with --teacher",
        )


def find_vae(metadata: Mapping[str, str], explicit: str | None) -> str:
    """--vae, else the VAE a model records (the built-in tiny model records its own), else the
    official one from the Hub cache."""
    if explicit:
        return resolve_local(explicit)
    stored = metadata.get("vae")
    if stored and (stored == BUILTIN_NAME or Path(stored).exists()):
        return stored
    try:
        return resolve_local("vae")
    except ActvarError as e:
        raise ConfigError("no VQVAE given", "pass --vae vae_ch160v4096z32.pth (or run `actvar download vae`)") from e


def resolve_local(spec: str) -> str:
    """A path, ``tiny``, or a model already downloaded (``d16``, ``vae``, ``USER/NAME``) as a path.

    Lookups of Hub names never touch the network: a name that is not cached is an error
    that says which download to run.
    """
    if spec == BUILTIN_NAME or Path(spec).exists():
        return spec
    repo_like = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    hub_like = spec.lower() in OFFICIAL_FILES or (repo_like and Path(spec).suffix not in (".pth", ".safetensors"))
    if not hub_like:
        return spec  # the loader says "no such file"
    try:
        paths = download(spec, offline=True)
    except ActvarError as e:
        raise CheckpointError(
            f"{spec} is neither a file nor a downloaded model", f"run `actvar download {spec}`"
        ) from e
    found = model_file_in(paths)
    if found is None:
        raise CheckpointError(f"no weights file among the downloaded files of {spec}")
    return str(found)


# ---------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------


def find_eval_json(model_path: str | os.PathLike, explicit: str | os.PathLike | None) -> dict | None:
    """The evaluation to show in the card: ``explicit``, else an eval.json beside the model."""
    import json

    path = Path(explicit) if explicit else Path(model_path).parent / "eval.json"
    if not path.exists():
        if explicit:
            raise ConfigError(f"--eval {path}: no such file")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable eval.json", "give the eval.json that `actvar eval` wrote") from e


def _card_text(repo_id: str, summary: dict, savings_rows: list[tuple], evals: dict | None, training: list) -> str:
    policy = summary["policy"]
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"An **ActVAR** version of `{summary['base_checkpoint']}` from "
        f"[{OFFICIAL_REPO}](https://huggingface.co/{OFFICIAL_REPO}): every FFN is split into "
        f"{summary['experts']} experts chosen per token by a router, and a gated token selector lets only "
        "the most useful tokens through each block at the largest scales (ActVAR, Zhang et al.). "
        "It was made with [actvar](https://github.com/) and keeps the upstream VAR state-dict names.",
        "",
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
            losses = ", ".join(f"{k} {v:.4g}" for k, v in t.get("final_losses", {}).items() if k != "grad_norm")
            lines.append(
                f"| {t.get('stage')} | {t.get('steps')} | {t.get('epochs', 0):.3g} | {t.get('global_batch')} | "
                f"{t.get('num_processes')} | {t.get('data')} | {losses} |"
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
    model_path: str | os.PathLike, repo_id: str, folder: str | os.PathLike, evals: dict | None
) -> Path:
    """The folder ``push`` uploads: model.safetensors, config.json and a model card (README.md)."""
    import json
    import shutil

    from huggingface_hub import ModelCard, ModelCardData

    from .checkpoint import atomic_path, atomic_write_text, read_checkpoint, stored_json
    from .errors import ConfigError
    from .flops import count_flops

    _, info = read_checkpoint(model_path)
    if info.kind != "actvar":
        raise ConfigError(f"{model_path} is not an ActVAR model", "push what `actvar moefy` or distillation wrote")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / MODEL_FILE) as tmp:
        shutil.copyfile(model_path, tmp)
    cfg = info.var_config
    report = count_flops(cfg.replace(num_experts=0), info.policy, cfg.num_experts)
    training = stored_json(info, "training") or []
    summary = {
        "base_checkpoint": info.metadata.get("base_checkpoint", ""),
        "experts": cfg.num_experts,
        "policy": info.policy.to_dict(),
    }
    config = {
        "format": "actvar",
        "var_config": cfg.to_dict(),
        "policy": info.policy.to_dict(),
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


def push(
    model_path: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    evals: dict | None = None,
    staging: str | os.PathLike | None = None,
    token: str | None = None,
) -> str:
    """Create the repository (if needed) and upload the folder; returns the commit URL."""
    import tempfile

    import huggingface_hub as hf

    target = DownloadTarget(repo_id, None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_push_folder(model_path, repo_id, staging or tmp, evals)
        api = hf.HfApi(endpoint=endpoint(), token=token, library_name="actvar")
        check_reachable(endpoint())
        try:
            with quiet_retries():
                api.create_repo(repo_id, private=private, exist_ok=True)
                info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload ActVAR model")
        except Exception as e:
            raise _hub_error(e, target, None, action="upload") from e
    return str(getattr(info, "commit_url", info))


def push_command(model, repo: str, private: bool, dry_run, eval_json, token: str | None) -> dict:
    """Check everything, then write the folder (``dry_run``) or upload it."""
    parse_target(repo)
    evals = find_eval_json(model, eval_json)
    if dry_run:
        folder = write_push_folder(model, repo, dry_run, evals)
        return {"folder": str(folder), "files": sorted(p.name for p in folder.iterdir())}
    return {"repo": repo, "url": push(model, repo, private=private, evals=evals, token=token)}
