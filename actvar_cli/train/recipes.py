"""Recipes: the paper's hyperparameters in YAML, with command-line flags overriding keys.

Defaults here are the paper's (section 4.1, supplementary section 6) and, where the
paper is silent, upstream VAR's training defaults. ``recipes/*.yaml`` restate them per
model with a comment on every key.
"""

from __future__ import annotations

import dataclasses
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
        """Every value in range, before any work starts."""
        positive = (
            "global_batch",
            "lr",
            "stage1_epochs",
            "stage2_epochs",
            "checkpoint_every",
            "keep_checkpoints",
            "teacher_samples_per_epoch",
            "shapes_samples_per_epoch",
            "pseudo_label_temperature",
            "grad_clip",
            "calib_images",
            "experts",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{key} = {value!r}: must be a number above 0")
        for key in ("stage1_lr", "stage2_lr"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, (int, float)) or not value > 0):
                raise ConfigError(f"{key} = {value!r}: must be a number above 0 (or null)")
        for key in (
            "weight_decay",
            "alpha",
            "beta",
            "teacher_cfg",
            "warmup",
            "lr_end",
            "cond_drop_rate",
            "teacher_top_k",
        ):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{key} = {value!r}: must be a number, 0 or more")
        for key, hi in (("warmup", 1), ("lr_end", 1), ("cond_drop_rate", 1), ("teacher_top_p", 1)):
            if not 0 <= getattr(self, key) <= hi:
                raise ConfigError(f"{key} = {getattr(self, key)!r}: must be between 0 and {hi}")
        betas = self.betas
        if not (
            isinstance(betas, (list, tuple))
            and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
        ):
            raise ConfigError(f"betas = {betas!r}: must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision = {self.precision!r}", "use auto, fp32 or bf16")
        self.policy()

    def policy(self) -> SparsityPolicy:
        return SparsityPolicy(
            scales=tuple(self.scales), token_rates=tuple(self.token_rates), weight_rates=(self.weight_rate,)
        )

    def with_policy(self, policy: SparsityPolicy) -> Recipe:
        """This recipe with a model's stored policy as its scales and rates."""
        return self.override(
            scales=list(policy.scales), token_rates=list(policy.token_rates), weight_rate=policy.weight_rates[0]
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage_lr(self, stage: int) -> float:
        specific = self.stage1_lr if stage == 1 else self.stage2_lr
        return self.lr if specific is None else specific

    def override(self, **values: Any) -> Recipe:
        """A copy with every non-None value replaced (flags that were not given are None)."""
        changes = {k: v for k, v in values.items() if v is not None}
        unknown = set(changes) - set(self.keys())
        if unknown:
            raise ConfigError(f"unknown recipe key(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


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


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Keys of a recipe file, after those of the file it ``extends``."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
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

    if cfg.replace(num_experts=0) == arch_config(BUILTIN_NAME):
        return load_recipe(BUILTIN_NAME)
    if (
        cfg.replace(num_experts=0) == official_var_config(cfg.depth)
        and (RECIPE_DIR / f"actvar-d{cfg.depth}.yaml").exists()
    ):
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
