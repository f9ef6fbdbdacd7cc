"""Ready for GPUs, checked on the CPU: the expert path needs no host sync and compiles whole."""

import pytest
import torch
from conftest import PARITY

from actvar_cli.convert.moefy import MoefyOptions, moefy
from actvar_cli.models.checkpoint import load_var
from actvar_cli.sparsity.blocks import GenerationState
from actvar_cli.sparsity.policy import SparsityPolicy

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def step_inputs():
    dense, _ = load_var(PARITY / "var_d2.pth")
    model, _ = moefy(dense, None, MoefyOptions(calib_images=0))
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(4, 256, 128, generator=g), torch.randn(4, 128, generator=g)
    kv = [(torch.randn(4, 2, 424, 64, generator=g), torch.randn(4, 2, 424, 64, generator=g)) for _ in model.blocks]

    def cache():
        c = model.new_cache()
        for layer, (k, v) in zip(c, kv):
            layer.append(k.clone(), v.clone())
        return c

    return model, x, cond, cache


def sparse_step(model, x, cond, cache, kernel):
    """The last scale of generation under the paper's policy (75% of tokens, 12 of 16 experts)."""
    return model.generation_step(x, cond, 9, cache, policy=SparsityPolicy(), state=GenerationState(kernel=kernel))


@torch.no_grad()
def test_every_kernel_computes_the_same_step(step_inputs):
    model, x, cond, cache = step_inputs
    loop = sparse_step(model, x, cond, cache(), "loop")
    for kernel in ("grouped", "masked"):
        torch.testing.assert_close(sparse_step(model, x, cond, cache(), kernel), loop, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_a_sparse_step_compiles_without_graph_breaks_and_matches_eager(step_inputs):
    """fullgraph=True fails on any graph break, and every host sync is one: none in the expert path."""
    model, x, cond, cache = step_inputs
    eager = sparse_step(model, x, cond, cache(), "grouped")
    torch._dynamo.reset()
    compiled = torch.compile(sparse_step, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(model, x, cond, cache(), "grouped"), eager, atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_the_grouped_kernel_runs_in_bf16_as_on_cuda(step_inputs):
    model, x, cond, cache = step_inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_step(model, x, cond, cache(), "grouped")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()  # logits come out in float32, as upstream's
