"""Our VAR and VQVAE compute what upstream computes (fixture: ../shared/fixtures/var-parity-d2)."""

import numpy as np
import pytest
import torch
from conftest import LABELS

from actvar_cli.generation.sampling import SamplingOptions, decode_images, generate

pytestmark = pytest.mark.shared  # uses ../shared/fixtures

IMG_TOL = 1e-3
LOGIT_TOL = 1e-3


def test_teacher_forcing_input_and_logits(d2, ref):
    var, vae = d2
    tokens = [torch.from_numpy(ref[f"greedy_tokens_s{i}"]) for i in range(10)]
    x = vae.quantize.idx_to_var_input(tokens)
    np.testing.assert_allclose(x.numpy(), ref["teacher_forcing_input"], atol=1e-5)
    with torch.no_grad():
        logits = var(torch.tensor(LABELS), torch.from_numpy(ref["teacher_forcing_input"]))
    assert logits.shape == (4, 680, 4096)
    np.testing.assert_allclose(logits[:, ::7].numpy(), ref["teacher_forcing_logits_every7"], atol=LOGIT_TOL)


@pytest.mark.slow
def test_greedy_generation_tokens_and_images(d2, ref):
    var, vae = d2
    gen = generate(var, vae, torch.tensor(LABELS), SamplingOptions(cfg=1.5, top_k=1, top_p=0.0))
    for si, tok in enumerate(gen.tokens):
        assert torch.equal(tok, torch.from_numpy(ref[f"greedy_tokens_s{si}"])), f"scale {si}"
    img = decode_images(vae, gen.f_hat)
    np.testing.assert_allclose(img.numpy(), ref["greedy_cfg1.5_img"], atol=IMG_TOL)


@pytest.mark.slow
def test_seeded_top_k_top_p_generation_with_upstream_rng(d2, ref):
    var, vae = d2
    rng = torch.Generator().manual_seed(1234)
    gen = generate(var, vae, torch.tensor(LABELS), SamplingOptions(cfg=1.5, top_k=900, top_p=0.96), rng=rng)
    img = decode_images(vae, gen.f_hat)
    np.testing.assert_allclose(img.numpy(), ref["seeded_k900_p0.96_cfg1.5_seed1234_img"], atol=IMG_TOL)


@pytest.mark.slow
def test_encoder_tokens(d2, ref):
    _, vae = d2
    with torch.no_grad():
        tokens = vae.img_to_idx(torch.from_numpy(ref["greedy_cfg1.5_img"]) * 2 - 1)
    for si, tok in enumerate(tokens):
        assert torch.equal(tok, torch.from_numpy(ref[f"encode_tokens_s{si}"])), f"scale {si}"


@pytest.mark.slow
def test_decoding_the_greedy_tokens_gives_the_greedy_images(d2, ref):
    _, vae = d2
    tokens = [torch.from_numpy(ref[f"greedy_tokens_s{i}"]) for i in range(10)]
    with torch.no_grad():
        img = vae.idx_to_img(tokens).add(1).mul(0.5)
    np.testing.assert_allclose(img.numpy(), ref["greedy_cfg1.5_img"], atol=IMG_TOL)


def test_per_image_sampler_draws_from_upstreams_filtered_distribution():
    """The fast per-image sampler and upstream's mask-then-multinomial define the same distribution."""
    from actvar_cli.generation.sampling import filter_top_k_top_p, sample_tokens_per_image

    torch.manual_seed(0)
    V, n = 64, 40_000
    logits = torch.randn(V) * 2
    for top_k, top_p in ((10, 0.0), (0, 0.8), (20, 0.7), (1, 0.96)):
        expected = filter_top_k_top_p(logits.view(1, 1, V), top_k, top_p).softmax(-1).view(V)
        draws = sample_tokens_per_image(
            logits.expand(1, n, V), top_k, top_p, [torch.Generator().manual_seed(top_k * 7 + 1)]
        )
        freq = torch.bincount(draws.view(-1), minlength=V).float() / n
        assert set(draws.unique().tolist()) <= set(expected.nonzero().view(-1).tolist())
        assert (freq - expected).abs().sum() / 2 < 0.015, (top_k, top_p)
