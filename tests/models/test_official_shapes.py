"""Our modules have exactly the keys and shapes of the real Hub checkpoints (built on meta: no memory)."""

import json

import pytest
import torch
from conftest import SHAPES

from actvar_cli.models.config import VAEConfig, infer_vae_config, infer_var_config, official_var_config
from actvar_cli.models.var import VAR
from actvar_cli.models.vqvae import VQVAE

pytestmark = pytest.mark.shared  # uses ../shared/fixtures

OFFICIAL = json.loads(SHAPES.read_text())


class Shape:
    """Stands in for a tensor: config inference only reads ``.shape``."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def as_spec(sd):
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()}


@pytest.mark.parametrize("depth", [16, 20, 24, 30, 36])
def test_var_keys_and_shapes_match_official(depth):
    expected = OFFICIAL[f"var_d{depth}"]
    with torch.device("meta"):
        model = VAR(official_var_config(depth))
    assert as_spec(model.state_dict()) == {k: [v[0], v[1]] for k, v in expected.items()}


@pytest.mark.parametrize("depth", [16, 20, 24, 30, 36])
def test_config_is_inferred_from_official_shapes(depth):
    shapes = {k: Shape(v[0]) for k, v in OFFICIAL[f"var_d{depth}"].items()}
    cfg = infer_var_config(shapes)
    assert cfg == official_var_config(depth)
    assert cfg.shared_aln == (depth == 36)
    assert cfg.image_size == (512 if depth == 36 else 256)


def test_vae_keys_and_shapes_match_official():
    expected = OFFICIAL["vae_ch160v4096z32"]
    with torch.device("meta"):
        vae = VQVAE(VAEConfig())
    assert as_spec(vae.state_dict()) == {k: [v[0], v[1]] for k, v in expected.items()}
    assert infer_vae_config({k: Shape(v[0]) for k, v in expected.items()}) == VAEConfig()


def test_older_uploads_without_l2_norm_attention_infer_attn_l2_norm_false():
    shapes = {k: Shape(v[0]) for k, v in OFFICIAL["var_d16"].items() if not k.endswith("scale_mul_1H11")}
    cfg = infer_var_config(shapes)
    assert cfg.attn_l2_norm is False and cfg.num_heads == 16
    with torch.device("meta"):
        model = VAR(cfg)
    assert set(model.state_dict()) == set(shapes)
    assert infer_var_config(shapes, num_heads=8).num_heads == 8
