"""Every way of making a VAR cheaper, built from one dense model and run by one generation path.

A method is a model (the dense one, or an ActVAR model converted from it) and a policy
(``policy.py``), so that FLOPs, wall clock and quality are measured by the same code for
all of them. Names take a parameter: ``fastvar:0.5``, ``dmoe:0.9``, ``skip-last:1``,
``actvar:PATH``. docs/other-methods.md gives each method's source and every choice made.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..quant.apply import quantize_model
from ..runtime import CPU, Runtime
from ..sparsity.methods import FAMILIES, last
from ..sparsity.policy import SparsityPolicy
from ..sparsity.stacks import Stack, parse_stack, stack_policy
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
    _conversions: dict = field(default_factory=dict, repr=False)

    def convert(self, policy: SparsityPolicy, router_fit: str = "pseudo-labels") -> VAR:
        """The dense model converted for ``policy``. Routers and selectors are fitted to the sparse
        scales' positions, not to the rates: one conversion per (router fit, scales) serves every rate."""
        key = (router_fit, tuple(policy.scales))
        if key not in self._conversions:
            opts = MoefyOptions(
                num_experts=self.num_experts,
                policy=policy,
                calib_images=self.calib_images,
                seed=self.seed,
                router_fit=router_fit,
            )
            self._conversions[key], _ = moefy(copy.deepcopy(self.dense), self.vae, opts, runtime=self.runtime)
        model = copy.copy(self._conversions[key])  # the same modules, its own policy
        model.policy = policy
        return model

    def build(self, spec: str) -> Method:
        """One method or a stack (``a+b``): its model, built once, and its merged policy."""
        stack = parse_stack(spec)
        S = len(self.dense.cfg.patch_nums)
        model = self._model(stack, S)
        policy = stack_policy(stack, S, model.policy if model is not self.dense else None)
        if policy is not None:
            policy.check_runnable(model.cfg)
        if stack.quantization_scheme:
            model = copy.deepcopy(model)  # a conversion's modules are shared by every stack built on it
            weights, activations = stack.quantization_scheme
            quantize_model(model, weights, activations=activations)
        what = FAMILIES[stack.single][1] if stack.single != "stack" else "a stack of " + ", ".join(stack.families)
        return Method(stack.name, stack.single, model, policy, what)

    def _model(self, stack: Stack, S: int) -> VAR:
        """The dense model itself, an ActVAR file, or one conversion fitted for the whole stack."""
        converting = [f for f in stack.families if f in CONVERTED]
        if stack.model_file is not None:
            if self.load_actvar is None:
                raise ConfigError(f"{stack.name} names a model file, and none can be read here")
            refit = [f for f in converting if f in ("static-experts", "dmoe")]
            if refit:
                raise ConfigError(f"{stack.name}: {refit[0]} fits its own router, and the model file has one")
            return self.load_actvar(stack.model_file)
        if not converting:
            return self.dense
        fits = {"static-experts": "static", "dmoe": "norms"}
        fit = next((fits[f] for f in converting if f in fits), "pseudo-labels")
        policy = stack_policy(stack, S)
        if policy is None or not policy.scales:  # a no-op setting: fit for the default scales
            policy = SparsityPolicy(scales=last(S, 2))
        return self.convert(policy, router_fit=fit)
