"""Every way of making a VAR cheaper, built from one dense model and run by one generation path.

A method is a model (the dense one, or an ActVAR model converted from it) and a policy
(``policy.py``), so that FLOPs, wall clock and quality are measured by the same code for
all of them. Names take a parameter: ``fastvar:0.5``, ``dmoe:0.9``, ``skip-last:1``,
``actvar:PATH``. docs/other-methods.md gives each method's source and every choice made.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..runtime import CPU, Runtime
from ..sparsity.methods import FAMILIES, last, method_policy, parse_method
from ..sparsity.policy import SparsityPolicy
from .moefy import MoefyOptions, moefy

# the methods whose model is converted (routers or selectors fitted); the others run the dense model
CONVERTED = ("actvar", "actvar-tokens", "actvar-experts", "static-experts", "fixed-tokens", "dmoe")


@dataclass
class Method:
    name: str  # as asked for, e.g. "fastvar:0.5"
    family: str
    model: VAR
    policy: SparsityPolicy | None
    description: str


@dataclass
class MethodBuilder:
    """Builds methods from one dense model; each conversion works on a copy of it."""

    dense: VAR
    vae: VQVAE
    num_experts: int = 16
    calib_images: int = 8
    seed: int = 0
    runtime: Runtime = CPU
    load_actvar: Callable[[str], VAR] | None = None  # reads an ActVAR file made from the dense model

    def convert(self, policy: SparsityPolicy, router_fit: str = "pseudo-labels") -> VAR:
        opts = MoefyOptions(
            num_experts=self.num_experts,
            policy=policy,
            calib_images=self.calib_images,
            seed=self.seed,
            router_fit=router_fit,
        )
        model, _ = moefy(copy.deepcopy(self.dense), self.vae, opts, runtime=self.runtime)
        return model

    def build(self, spec: str) -> Method:
        family, arg = parse_method(spec)
        model, policy = self._model_and_policy(family, arg, len(self.dense.cfg.patch_nums))
        if policy is not None:
            policy.check_runnable(model.cfg)
        return Method(spec.strip(), family, model, policy, FAMILIES[family][1])

    def _model_and_policy(self, family: str, arg: str | None, S: int):
        if family == "dense":
            return self.dense, None
        if family.startswith("actvar"):
            if arg and self.load_actvar is None:
                raise ConfigError(f"{family}:{arg} names a model file, and none can be read here")
            model = self.load_actvar(arg) if arg else self.convert(SparsityPolicy(scales=last(S, 2)))
            return model, method_policy(family, arg, S, model.policy)
        policy = method_policy(family, arg, S)
        if family in CONVERTED:
            fit = {"static-experts": "static", "dmoe": "norms"}.get(family, "pseudo-labels")
            return self.convert(policy, router_fit=fit), policy
        return self.dense, policy
