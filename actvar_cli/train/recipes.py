"""Recipes: the paper's hyperparameters in YAML, with command-line flags overriding keys.

Defaults here are the paper's (section 4.1, supplementary section 6) and, where the
paper is silent, upstream VAR's training defaults. ``recipes/*.yaml`` restate them per
model with a comment on every key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..models.config import BUILTIN_NAME, arch_config, official_var_config
from ..sparsity.policy import SparsityPolicy


def _recipe_dir() -> Path:
    """The recipes shipped in the package (the repository's recipes/ folder, mapped by setuptools)."""

    return Path(str(files("actvar_cli.recipe_files")))


RECIPE_DIR = _recipe_dir()


@dataclass
class Recipe:
    # conversion (moefy)
    experts: int = 16
    split: str = "cluster"
    scales: list[int] = field(default_factory=lambda: [9, 10])
    token_rates: list[float] = field(default_factory=lambda: [0.75, 0.75])
    weight_rate: float = 0.75
    token_rule: str = "selector"  # selector (the paper: each block its own) or fixed (one choice per scale)
    skipped_kv: bool = False  # skipped tokens stay keys of the blocks that skip them
    skipped_update: bool = False  # skipped tokens receive the block's previous-scale update, resized
    expert_means: bool = False  # dropped experts add their mean output (fitted at conversion)
    router_target: str = "distance"  # the experts a router learns to pick: closest to the FFN, or largest
    calib_images: int = 8
    # training, both stages
    data: str = "teacher"
    global_batch: int = 512
    lr: float = 2e-4
    stage1_lr: float | None = None
    stage2_lr: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    warmup: float = 0.02
    lr_end: float = 0.01
    grad_clip: float = 2.0
    cond_drop_rate: float = 0.1
    stage1_epochs: float = 2
    stage2_epochs: float = 10
    alpha: float = 0.05
    beta: float = 0.01
    pseudo_label_temperature: float = 1.0
    delta_rank: int = 0  # stage 2 trains sparse-scale deltas of this rank; 0: attention, experts, head everywhere
    stage2_kl: str = "reverse"  # the paper's KL(student || teacher), or forward: KL(teacher || student)
    stage2_cfg: float = 1.5  # scales without guidance (cfg-off) learn the teacher's guidance at this cfg
    teacher_samples_per_epoch: int = 1_281_167
    shapes_samples_per_epoch: int = 10_000
    teacher_cfg: float = 0.0
    teacher_top_k: int = 900
    teacher_top_p: float = 0.96
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    precision: str = "auto"
    base: str | None = None

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def validate(self) -> None:
        """Every value of the right type, finite and in range, before any work starts."""
        for key, (kind, low, high) in RULES.items():
            check_value(key, getattr(self, key), kind, low, high)
        if len(self.betas) != 2:
            raise ConfigError(f"betas = {self.betas!r}: must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} = {getattr(self, key)!r}", f"use {' or '.join(allowed)}")
        self.policy()

    def policy(self) -> SparsityPolicy:
        return SparsityPolicy(
            scales=tuple(self.scales),
            token_rates=tuple(self.token_rates),
            weight_rates=(self.weight_rate,),
            token_rule=self.token_rule,
            skipped_kv=self.skipped_kv,
            skipped_update=self.skipped_update,
        )

    def with_policy(self, policy: SparsityPolicy) -> Recipe:
        """This recipe with a model's stored policy as its scales and rates (a policy that only turns
        guidance off has none: the recipe's stay, unused)."""
        if not policy.scales:
            return self
        return self.override(
            scales=list(policy.scales),
            token_rates=list(policy.token_rates),
            weight_rate=policy.weight_rates[0],
            token_rule=policy.token_rule if policy.token_rule in ("selector", "fixed") else self.token_rule,
            skipped_kv=policy.skipped_kv,
            skipped_update=policy.skipped_update,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage_lr(self, stage: int) -> float:
        specific = self.stage1_lr if stage == 1 else self.stage2_lr
        return self.lr if specific is None else specific

    def override(self, **values: Any) -> Recipe:
        """A copy with every non-None value replaced (flags that were not given are None)."""
        changes = {
            k: as_number(v) if RULES.get(k, ("str",))[0] != "str" else v for k, v in values.items() if v is not None
        }
        unknown = set(changes) - set(self.keys())
        if unknown:
            raise ConfigError(f"unknown recipe key(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


CHOICES = {
    "precision": ("auto", "fp32", "bf16"),
    "token_rule": ("selector", "fixed"),
    "router_target": ("distance", "norm"),
    "stage2_kl": ("reverse", "forward"),
    "split": ("cluster", "contiguous", "coactivation"),
}
# key -> (kind, lowest, highest): int, float (finite), float? (or null), ints / floats (lists), str (free)
RULES: dict[str, tuple[str, float, float]] = {
    "experts": ("int", 2, 1024),
    "split": ("str", 0, 0),
    "scales": ("ints", 1, 64),
    "token_rates": ("floats", 1e-9, 1),
    "weight_rate": ("float", 1e-9, 1),
    "token_rule": ("str", 0, 0),
    "skipped_kv": ("bool", 0, 0),
    "skipped_update": ("bool", 0, 0),
    "expert_means": ("bool", 0, 0),
    "router_target": ("str", 0, 0),
    "calib_images": ("int", 0, 1_000_000),
    "data": ("str", 0, 0),
    "global_batch": ("int", 1, 1 << 24),
    "lr": ("float", 1e-12, 10),
    "stage1_lr": ("float?", 1e-12, 10),
    "stage2_lr": ("float?", 1e-12, 10),
    "betas": ("floats", 0, 0.999999),
    "weight_decay": ("float", 0, 100),
    "warmup": ("float", 0, 1),
    "lr_end": ("float", 0, 1),
    "grad_clip": ("float", 1e-12, 1e9),
    "cond_drop_rate": ("float", 0, 1),
    "stage1_epochs": ("float", 1e-9, 1e6),
    "stage2_epochs": ("float", 1e-9, 1e6),
    "alpha": ("float", 0, 1e6),
    "beta": ("float", 0, 1e6),
    "pseudo_label_temperature": ("float", 1e-6, 1e6),
    "delta_rank": ("int", 0, 4096),
    "stage2_kl": ("str", 0, 0),
    "stage2_cfg": ("float", 0, 100),
    "teacher_samples_per_epoch": ("int", 1, 1 << 40),
    "shapes_samples_per_epoch": ("int", 1, 1 << 40),
    "teacher_cfg": ("float", 0, 100),
    "teacher_top_k": ("int", 0, 1 << 24),
    "teacher_top_p": ("float", 0, 1),
    "checkpoint_every": ("int", 1, 1 << 40),
    "keep_checkpoints": ("int", 1, 1000),
    "seed": ("int", 0, (1 << 63) - 1),
    "precision": ("str", 0, 0),
    "base": ("str?", 0, 0),
}


def check_value(key: str, value: Any, kind: str, low: float, high: float) -> None:
    """One recipe value against its rule; one line that names the key when it fails."""
    if kind.endswith("?") and value is None:
        return
    kind = kind.rstrip("?")
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: must be text")
        return
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: must be true or false")
        return
    if kind in ("ints", "floats"):
        if not isinstance(value, (list, tuple)) or not value or len(value) > 64:
            raise ConfigError(f"{key} = {value!r}: must be a list of numbers, e.g. [0.75, 0.75]")
        for v in value:
            check_value(key, v, kind[:-1], low, high)
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "int" and not is_int:
        raise ConfigError(f"{key} = {value!r}: must be a whole number")
    if not (is_int or isinstance(value, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r}: must be a finite number")
    if not low <= value <= high:
        raise ConfigError(f"{key} = {value!r}: must lie between {low:g} and {high:g}")


def as_number(value: Any) -> Any:
    """YAML reads ``1e-4`` as text (only ``1.0e-4`` is a float): numbers written either way count."""
    if isinstance(value, list):
        return [as_number(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value) if not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            return value
    return value


def with_policy_flags(
    recipe: Recipe,
    scales: list[int] | None = None,
    token_rate: float | None = None,
    token_rates: list[float] | None = None,
    weight_rate: float | None = None,
) -> Recipe:
    """Apply --scales / --token-rate / --token-rates / --weight-rate to a recipe.

    New scales without new rates reuse the recipe's first token rate on every scale.
    """
    if token_rate is not None and token_rates is not None:
        raise ConfigError("give --token-rate or --token-rates, not both")
    new_scales = scales if scales is not None else recipe.scales
    if token_rates is None:
        if token_rate is not None:
            token_rates = [token_rate] * len(new_scales)
        elif scales is not None and len(scales) != len(recipe.token_rates):
            token_rates = [recipe.token_rates[0]] * len(new_scales)
    out = recipe.override(scales=scales, token_rates=token_rates, weight_rate=weight_rate)
    out.policy()  # validate
    return out


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A path, or a short name (``d16``, ``tiny``) of a file in the repository's recipes/ folder."""
    p = Path(name_or_path)
    if p.exists():
        return p
    for candidate in (RECIPE_DIR / f"actvar-{name_or_path}.yaml", RECIPE_DIR / f"{name_or_path}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError(f"no recipe file {name_or_path}", "give a path such as recipes/actvar-d16.yaml")


MAX_RECIPE_BYTES = 1 << 20


class _NoAliases(yaml.SafeLoader):
    """YAML without aliases: an alias bomb (a billion laughs) cannot expand."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise ConfigError("YAML aliases (*name) are not allowed in recipes", "write the value out")
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """Plain YAML values (numbers, lists, strings, mappings), no tags and no aliases."""
    return yaml.load(text, Loader=_NoAliases)  # noqa: S506 (a SafeLoader)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"recipe {path} is not a regular file")
    with open(path, "rb") as f:
        raw = f.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {path} is larger than {MAX_RECIPE_BYTES} bytes", "a recipe is a short YAML file")
    return raw.decode("utf-8", errors="replace")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Keys of a recipe file, after those of the file it ``extends``."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        data = load_yaml(_read_text(path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from e
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a mapping of recipe keys")
    data = dict(data)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return {**_read_yaml(path.parent / str(parent), (*seen, path.resolve())), **data}


def recipe_for(cfg, name: str | None = None) -> Recipe:
    """The recipe named for a model: ``tiny``'s for the built-in model, ``actvar-dN.yaml`` for an
    official architecture, else the paper's settings on the last two scales of its layout."""

    if cfg.dense == arch_config(BUILTIN_NAME):
        return load_recipe(BUILTIN_NAME)
    if cfg.dense == official_var_config(cfg.depth) and (RECIPE_DIR / f"actvar-d{cfg.depth}.yaml").exists():
        return load_recipe(f"d{cfg.depth}")
    n = len(cfg.patch_nums)
    return Recipe().override(scales=[n - 1, n])


def pick_recipe(config: str | Path | None, cfg) -> Recipe:
    """``--config`` when given, else the recipe named for the model (``recipe_for``)."""
    return load_recipe(config) if config else recipe_for(cfg)


def load_recipe(source: str | Path | None) -> Recipe:
    if source is None:
        return Recipe()
    path = resolve_recipe_path(source)
    data = _read_yaml(path)
    unknown = sorted(set(data) - set(Recipe.keys()))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}", "valid keys: " + ", ".join(Recipe.keys()))
    recipe = Recipe().override(**data)
    recipe.policy()  # validates scales and rates early
    return recipe
