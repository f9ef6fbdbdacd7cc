"""The demo on the reference model: three models side by side, one picture, one summary."""

import json

import numpy as np
import pytest
from PIL import Image

from actvar_cli.commands import demo


@pytest.mark.slow
def test_demo_measures_dense_converted_and_distilled_and_draws_them(tmp_path):
    req = demo.DemoRequest(tmp_path, stage1_steps=2, stage2_steps=2, eval_images=20, agreement_pyramids=4,
                           bench_repeats=1)  # fmt: skip
    summary = demo.run(req).to_dict()
    rows = summary["models"]
    assert list(rows) == ["dense", "converted", "distilled"]
    for name, r in rows.items():
        assert {"class_accuracy", "fid", "token_agreement", "logit_kl"} <= set(r), name
        assert all(np.isfinite(v) for v in r.values()), name
    assert rows["dense"]["token_agreement"] == 1.0 and rows["dense"]["logit_kl"] < 1e-6
    assert 0 < summary["flops_savings"] < 1 and summary["measured_speedup"] > 0
    assert json.loads((tmp_path / "summary.json").read_text())["models"].keys() == rows.keys()
    picture = np.asarray(Image.open(tmp_path / "compare.png"))
    assert picture.shape[0] > 3 * 3 * 32 and picture.shape[1] > 10 * 3 * 32  # 3 rows of 10 enlarged images
