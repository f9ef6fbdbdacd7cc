"""The memory plan: every component, the effect of each way of saving memory, and the int8 KV cache."""

import json

import pytest
import torch

from actvar_cli.measure.memory import generation_plan, weight_bytes
from actvar_cli.models.config import arch_config
from actvar_cli.models.kv_cache import LayerCache
from actvar_cli.sparsity.stacks import parse_stack, stack_policy


def test_memory_json_gives_the_total_and_the_components(run_cli):
    r = json.loads(run_cli("memory", "--arch", "d30", "--batch-size", "64", "--json").stdout)
    assert set(r["components"]) >= {"weights", "kv_cache", "activations", "decode", "cfg_doubling"}
    c = r["components"]
    generation = sum(v for k, v in c.items() if k not in ("weights", "decode", "cfg_doubling"))
    assert r["total_gb"] == pytest.approx(c["weights"] + max(generation, c["decode"]))  # decode runs after
    assert 0.25 < r["components"]["kv_cache"] / (64 * 2 * 30 * 680 * 1920 * 2 * 4 / 2**30) < 1.01  # fp32 K and V
    train = json.loads(run_cli("memory", "--arch", "d30", "--train", "stage2", "--batch-size", "32", "--json").stdout)
    assert {"student", "gradients", "adamw_state", "teacher", "activations"} <= set(train["components"])
    sharded = json.loads(
        run_cli("memory", "--arch", "d30", "--train", "stage2", "--batch-size", "32", "--shard", "8", "--json").stdout
    )
    assert sharded["components"]["adamw_state"] == pytest.approx(train["components"]["adamw_state"] / 8)


def test_each_way_of_saving_memory_shows_in_the_plan():
    cfg = arch_config("d16")

    def plan(stack=None, **kw):
        policy = stack_policy(parse_stack(stack), 10) if stack else None
        return generation_plan(cfg, batch_size=16, policy=policy, **kw).components

    dense = plan()
    assert plan(dtype="bf16")["kv_cache"] == pytest.approx(dense["kv_cache"] / 2)
    assert plan("kv-int8")["kv_cache"] < 0.3 * dense["kv_cache"]
    assert plan("fixed-tokens:0.5")["kv_cache"] < dense["kv_cache"]
    assert plan(quantization={"weights": "int8", "group_size": None})["weights"] < 0.3 * dense["weights"]
    assert weight_bytes(cfg, {"weights": "int4", "group_size": 128}) < weight_bytes(cfg, {"weights": "int8"})


def test_the_int8_kv_cache_is_close_to_the_float_one_and_a_quarter_of_its_size():
    g = torch.Generator().manual_seed(0)
    exact, small = LayerCache(24), LayerCache(24, bits=8)
    for n in (4, 9, 11):
        k, v = torch.randn(2, 3, n, 16, generator=g), torch.randn(2, 3, n, 16, generator=g)
        (k1, v1), (k2, v2) = exact.append(k, v), small.append(k, v)
        torch.testing.assert_close(k2, k1, atol=0.03, rtol=0.02)
        torch.testing.assert_close(v2, v1, atol=0.03, rtol=0.02)
    assert small._k.dtype == torch.int8 and small._k.element_size() * 4 == exact._k.element_size()


@pytest.mark.slow
def test_a_stack_with_an_int8_kv_cache_generates_the_dense_models_picture(tiny):
    from actvar_cli.generation.sampling import SamplingOptions, generate, image_generators

    model, vae = tiny
    policy = stack_policy(parse_stack("kv-int8"), 7)
    labels = torch.tensor([0, 3, 6])
    rng = image_generators(0, [0, 1, 2], "cpu")
    dense = generate(model, vae, labels, SamplingOptions(top_k=1, top_p=0), rng=rng)
    small = generate(model, vae, labels, SamplingOptions(top_k=1, top_p=0), rng=rng, policy=policy)
    same = sum((a == b).float().mean().item() for a, b in zip(dense.tokens, small.tokens)) / len(dense.tokens)
    assert same > 0.9
