"""Every way of making a VAR cheaper, built from one dense model and run by one generation path.

A method is a model (the dense one, or an ActVAR model converted from it) and a policy
(``policy.py``), so that FLOPs, wall clock and quality are measured by the same code for
all of them. Names take a parameter: ``fastvar:0.5``, ``dmoe:0.9``, ``skip-last:1``,
``actvar:PATH``. docs/methods.md gives each method's source and every choice made.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .conversion import (
    MoefyOptions,
    MoefyReport,
    calibration_vae,
    check_options,
    conversion_metadata,
    convert_checkpoint,
    moefy,
)
from .errors import ConfigError
from .method_specs import FAMILIES, last, method_policy, parse_method
from .model import VAR
from .policy import SparsityPolicy
from .progress import Progress
from .vqvae import VQVAE


@dataclass
class Method:
    name: str  # as asked for, e.g. "fastvar:0.5"
    family: str
    model: VAR
    policy: SparsityPolicy | None
    description: str


@dataclass
class MethodBuilder:
    """Builds methods from one dense model; ``load_dense`` gives a fresh copy for each conversion."""

    load_dense: Callable[[], VAR]
    vae: VQVAE
    num_experts: int = 16
    calib_images: int = 8
    seed: int = 0
    load_actvar: Callable[[str], VAR] | None = None  # reads an ActVAR file made from the dense model

    def convert(self, policy: SparsityPolicy, router_fit: str = "pseudo-labels") -> VAR:
        opts = MoefyOptions(
            num_experts=self.num_experts,
            policy=policy,
            calib_images=self.calib_images,
            seed=self.seed,
            router_fit=router_fit,
        )
        model, _ = moefy(self.load_dense(), self.vae, opts)
        return model

    def build(self, spec: str) -> Method:
        family, arg = parse_method(spec)
        dense = self.load_dense()
        S = len(dense.cfg.patch_nums)
        model, policy = self._model_and_policy(family, arg, dense, S)
        if policy is not None:
            policy.check_runnable(model.cfg)
        return Method(spec.strip(), family, model, policy, FAMILIES[family][1])

    def _model_and_policy(self, family: str, arg: str | None, dense: VAR, S: int):
        if family == "dense":
            return dense, None
        if family.startswith("actvar"):
            model = self.load_actvar(arg) if arg else self.convert(SparsityPolicy(scales=last(S, 2)))
            return model, method_policy(family, arg, S, model.policy)
        policy = method_policy(family, arg, S)
        if family in ("static-experts", "fixed-tokens", "dmoe"):
            fit = {"static-experts": "static", "dmoe": "norms"}.get(family, "pseudo-labels")
            return self.convert(policy, router_fit=fit), policy
        return dense, policy


@dataclass
class MoefyRequest:
    """What ``actvar moefy`` was asked for; None means the recipe's value."""

    source: str
    output: str | os.PathLike
    config: str | None = None
    experts: int | None = None
    split: str | None = None
    calib_images: int | None = None
    policy_flags: dict = field(default_factory=dict)  # scales, token_rate, token_rates, weight_rate
    vae: str | None = None
    seed: int = 0
    device: str = "auto"
    num_heads: int | None = None
    method: str | None = None  # another method's model (docs/methods.md)


def moefy_command(req: MoefyRequest, progress: Progress | None = None) -> dict:
    """``actvar moefy``: the recipe (named for the model unless ``config``), flags over its keys,
    every value checked, then the conversion."""
    from pathlib import Path

    from .checkpoint import check_output_file, read_checkpoint, require_var
    from .device import pick_device
    from .recipes import load_recipe, recipe_for, with_policy_flags

    output = Path(req.output)
    check_output_file(output, (".safetensors",), (req.source,))
    _, info = read_checkpoint(req.source, req.num_heads)
    require_var(info)
    recipe = load_recipe(req.config) if req.config else recipe_for(info.var_config)
    recipe = recipe.override(experts=req.experts, split=req.split, calib_images=req.calib_images)
    recipe = with_policy_flags(recipe, **req.policy_flags)
    opts = MoefyOptions(
        num_experts=recipe.experts,
        split=recipe.split,
        policy=recipe.policy(),
        calib_images=recipe.calib_images,
        seed=req.seed,
    )
    check_options(info.var_config, opts)
    device = pick_device(req.device)
    if req.method:
        return convert_method(req.source, output, req.method, opts, req.vae, req.num_heads, device)
    return convert_checkpoint(req.source, output, opts, req.vae, req.num_heads, device, progress)


def convert_method(source: str, output, spec: str, opts: MoefyOptions, vae: str | None, num_heads, device) -> dict:
    """Write another method's converted model (docs/methods.md) with its policy, to distil or compare it."""
    from .checkpoint import load_vae, load_var, save_model

    family, _ = parse_method(spec)
    if family not in ("actvar", "actvar-tokens", "actvar-experts", "static-experts", "fixed-tokens", "dmoe"):
        raise ConfigError(f"{family} runs the dense model itself: nothing to convert", "run it with actvar compare")
    dense, info = load_var(source, num_heads=num_heads)
    vae_source = calibration_vae(info.metadata, vae)
    if vae_source is None:
        raise ConfigError(f"--method {spec} fits its router or selector on calibration tokens", "pass --vae")
    builder = MethodBuilder(
        lambda: load_var(source, num_heads=num_heads)[0].to(device),
        load_vae(vae_source, dense.cfg.patch_nums)[0].to(device),
        opts.num_experts,
        opts.calib_images,
        opts.seed,
    )
    m = builder.build(spec)
    m.model.policy = m.policy
    report = MoefyReport(router_init=f"method {spec}", calib_images=opts.calib_images)
    meta = {**conversion_metadata(info, source, vae_source, opts, report), "method": spec}
    save_model(m.model, output, meta)
    return {"output": str(output), "policy": m.policy.to_dict(), **meta}
