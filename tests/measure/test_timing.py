"""Timing: run-by-run ratios, the per-scale bound, timed steps, plot labels."""

import pytest

from actvar_cli.measure.timing import paired_speedup, scale_table, timed_steps
from actvar_cli.runtime import CPU
from actvar_cli.sparsity.policy import SparsityPolicy


def test_paired_speedup_compares_each_run_with_its_neighbour():
    """A machine that slows down in the middle of a benchmark must not decide the ratio."""
    dense, sparse = [1.0, 2.0, 4.0], [0.5, 2.0, 2.0]  # medians 2.0 and 2.0; pairs 2x, 1x, 2x
    assert paired_speedup(dense, sparse) == 2.0
    with pytest.raises(ValueError):
        paired_speedup([1.0], [1.0, 2.0])


def test_the_per_scale_bound_is_the_speedup_of_steps_at_their_flops_ratio():
    from actvar_cli.models.config import arch_config
    from actvar_cli.sparsity.flops import count_flops

    flops = count_flops(arch_config("tiny"), SparsityPolicy(scales=(6, 7)))
    ideal = flops.dense_flops / flops.sparse_flops
    dense_steps = [sum(s.dense.values()) * 1e-9 for s in flops.scales]  # time proportional to FLOPs
    at_ratio = [sum(s.sparse.values()) * 1e-9 for s in flops.scales]
    for outside in (0.0, 0.05):
        steps = {"dense": [dense_steps] * 3, "sparse": [at_ratio] * 3}
        table = scale_table(sum(dense_steps) + outside, steps, flops, ideal)
        assert table["outside_steps_s"] == pytest.approx(outside, abs=1e-12)
        assert [r["speedup"] for r in table["scales"]] == pytest.approx([r["flops_ratio"] for r in table["scales"]])
        assert table["bound_speedup"] == pytest.approx((sum(dense_steps) + outside) / (sum(at_ratio) + outside))
    assert table["bound_speedup"] < ideal  # work outside the steps holds it back
    assert scale_table(sum(dense_steps), steps, flops, ideal)["bound_efficiency"] == pytest.approx(1.0)


def test_timing_steps_leaves_a_compiled_step_in_place():
    class Model:
        def generation_step(self, x):
            return x + 1

    compiled, plain = Model(), Model()
    compiled.generation_step = step = lambda x: x + 2  # what compile_steps does
    for model, expected in ((compiled, 3), (plain, 2)):
        with timed_steps(model, CPU) as seconds:
            assert model.generation_step(1) == expected
        assert len(seconds) == 1
    assert compiled.generation_step is step and "generation_step" not in vars(plain)


def test_plot_labels_name_a_model_file_by_its_run():
    from actvar_cli.measure.plots import short_name

    assert short_name("actvar:runs/quality/default-s2/model.safetensors") == "actvar:default-s2"
    assert short_name("actvar:runs/quality/aggressive.safetensors") == "actvar:aggressive"
    assert short_name("fastvar:0.5") == "fastvar:0.5"
