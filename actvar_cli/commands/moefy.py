"""``actvar moefy``: a dense VAR becomes an ActVAR model (or another method's converted model).

The recipe (named for the model unless ``--config``) gives experts, split, scales and rates;
flags override its keys. The dense model is read once; the file written records where it came
from (base checkpoint, its sha256, the VQVAE used for calibration) and how it was made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..convert.method_models import CONVERTED, MethodBuilder
from ..convert.moefy import MoefyOptions, MoefyReport, moefy
from ..errors import ActvarError, ConfigError
from ..files import check_output_file, sha256_file
from ..models.checkpoint import save_model
from ..models.config import BUILTIN_NAME
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..progress import Progress
from ..quant.apply import file_scheme, refuse_quantized
from ..runtime import Runtime
from ..sparsity.stacks import parse_stack, stack_policy
from ..train.recipes import pick_recipe, with_policy_flags
from .loading import Loaded, find_vae, load_models, resolve, vae_for
from .result import Result


@dataclass
class MoefyRequest:
    """None means the recipe's value."""

    source: str
    output: Path
    config: str | None = None
    experts: int | None = None
    split: str | None = None
    calib_images: int | None = None
    policy_flags: dict = field(default_factory=dict)  # scales, token_rate, token_rates, weight_rate
    vae: str | None = None
    seed: int = 0
    device: str = "auto"
    num_heads: int | None = None
    method: str | None = None  # another method's model (docs/other-methods.md)


@dataclass
class MoefyResult(Result):
    output: str
    policy: dict[str, Any]
    metadata: dict[str, Any]  # what the file records about its making

    @property
    def router_init(self) -> str:
        return self.metadata["router_init"]

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "policy": self.policy, **self.metadata}


def run(req: MoefyRequest, progress: Progress | None = None) -> MoefyResult:
    output = Path(req.output)
    source = resolve(req.source)
    check_output_file(output, (".safetensors",), (source,))
    stack = parse_stack(req.method) if req.method else None
    if stack is not None and (stack.families == ("dense",) or stack.model_file):
        raise ConfigError(f"--method {req.method}: moefy makes a model from the dense one", "compare runs model files")
    refuse_quantized(file_scheme(source), req.source, "give the float VAR it was quantized from")
    runtime = Runtime.pick(req.device)
    loaded = load_models(source, vae=False, runtime=runtime, num_heads=req.num_heads)
    opts = _options(req, loaded.model)
    vae_source = _calibration_vae(loaded, req.vae)
    needs_vae = opts.calib_images > 0 and vae_source is not None
    vae = vae_for(loaded.model, vae_source, runtime) if needs_vae else None
    if stack is not None:
        stack_policy(stack, len(loaded.model.cfg.patch_nums))  # a stack that cannot hold: refused before work
        if vae is None and any(f in CONVERTED for f in stack.families):
            raise ConfigError(f"--method {req.method} fits its router or selector on calibration tokens", "pass --vae")
        model, report = _method_model(req.method, loaded.model, vae, opts, runtime)
    else:
        model, report = moefy(loaded.model, vae, opts, runtime=runtime, progress=progress)
    meta = provenance(loaded, vae_source, opts, report)
    if req.method:
        meta["method"] = req.method
    save_model(model, output, meta)
    return MoefyResult(str(output), model.policy.to_dict() if model.policy else None, meta)


def _options(req: MoefyRequest, dense: VAR) -> MoefyOptions:
    recipe = pick_recipe(req.config, dense.cfg)
    recipe = recipe.override(experts=req.experts, split=req.split, calib_images=req.calib_images)
    recipe = with_policy_flags(recipe, **req.policy_flags)
    return MoefyOptions(
        num_experts=recipe.experts,
        split=recipe.split,
        policy=recipe.policy(),
        calib_images=recipe.calib_images,
        seed=req.seed,
        router_target=recipe.router_target,
        expert_means=recipe.expert_means,
    )


def _calibration_vae(loaded: Loaded, explicit: str | None) -> str | None:
    """``explicit``, the model's own (tiny's for tiny), the cached official one, or None (then
    router and selector come from weight statistics)."""
    if explicit:
        return resolve(explicit)
    try:
        return find_vae(loaded.info.metadata, None)
    except ActvarError:
        return None


def _method_model(spec: str, dense: VAR, vae: VQVAE, opts: MoefyOptions, runtime: Runtime):
    builder = MethodBuilder(
        dense, vae, num_experts=opts.num_experts, calib_images=opts.calib_images, seed=opts.seed, runtime=runtime
    )
    m = builder.build(spec)
    m.model.policy = m.policy
    return m.model, MoefyReport(router_init=f"method {spec}", calib_images=opts.calib_images)


def provenance(loaded: Loaded, vae_source: str | None, opts: MoefyOptions, report: MoefyReport) -> dict[str, Any]:
    """What an ActVAR file records about its making: base model and hash, split, calibration."""
    info = loaded.info
    builtin = info.format == "builtin"

    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    if not vae_source:
        vae = ""
    elif vae_source == info.metadata.get("vae") or vae_source == BUILTIN_NAME:
        vae = vae_source
    else:
        vae = str(Path(vae_source).resolve())
    return {
        "base_checkpoint": info.name,
        "base_checkpoint_path": loaded.source if builtin else str(Path(loaded.source).resolve()),
        "base_sha256": "" if builtin else sha256_file(loaded.source),
        "experts": opts.num_experts,
        "split": opts.split,
        "router_init": report.router_init,
        "vae": vae,
        "calibration": {
            "images": report.calib_images,
            "tokens_per_block": report.calib_tokens,
            "router_r2": mean(report.router_r2),
            "selector_r2": mean(report.selector_r2),
            "router_topk_agreement": mean(report.router_topk_agreement),
        },
        "actvar_version": __version__,
    }
