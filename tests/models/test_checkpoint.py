"""Loading is strict and safe; bad files give one clear error each."""

import pickle

import pytest
import torch
from conftest import PARITY

from actvar_cli.errors import CheckpointError
from actvar_cli.models.checkpoint import load_vae, load_var, read_state_dict, save_model

pytestmark = pytest.mark.shared  # uses ../shared/fixtures


def test_official_file_loads_with_its_buffers_strictly():
    sd, _, _ = read_state_dict(PARITY / "var_d2.pth")
    assert {"lvl_1L", "attn_bias_for_masking", "blocks.0.attn.zero_k_bias"} <= set(sd)
    model, info = load_var(PARITY / "var_d2.pth")
    assert info.kind == "var" and info.format == "pth"
    assert set(model.state_dict()) == set(sd)
    assert torch.equal(model.lvl_1L, sd["lvl_1L"])


def test_vae_buffer_is_accepted():
    vae, info = load_vae(PARITY / "vae_ch32v4096z32.pth")
    assert info.kind == "vqvae" and info.vae_config.ch == 32
    assert vae.quantize.ema_vocab_hit_SV.shape == (10, 4096)


def test_unexpected_key_is_an_error(tmp_path):
    sd, _, _ = read_state_dict(PARITY / "var_d2.pth")
    sd["blocks.0.surprise"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="does not match"):
        load_var(tmp_path / "extra.pth")


def test_missing_derivable_buffers_are_rebuilt(tmp_path):
    sd, _, _ = read_state_dict(PARITY / "var_d2.pth")
    full = {k: v.clone() for k, v in sd.items()}
    for k in ("lvl_1L", "attn_bias_for_masking"):
        del sd[k]
    torch.save(sd, tmp_path / "nobuf.pth")
    model, _ = load_var(tmp_path / "nobuf.pth")
    assert torch.equal(model.lvl_1L, full["lvl_1L"])
    assert torch.equal(model.attn_bias_for_masking, full["attn_bias_for_masking"])


def test_safetensors_round_trip_keeps_function_and_metadata(tmp_path, d2):
    var, _ = d2
    save_model(var, tmp_path / "m.safetensors", {"note": {"a": 1}})
    again, info = load_var(tmp_path / "m.safetensors")
    assert info.format == "safetensors" and info.metadata["format"] == "actvar"
    assert info.var_config == var.cfg
    for (k, a), (_, b) in zip(var.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob("*.partial")), "temporary file left behind"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("hello, I am a text file with some words in it\n" * 10), "not a checkpoint"),
        (lambda p: p.write_bytes((PARITY / "var_d2.pth").read_bytes()[:100_000]), "truncated or corrupt"),
    ],
    ids=["missing", "empty", "text", "truncated-pth"],
)
def test_bad_files(tmp_path, make, message):
    path = tmp_path / "model.pth"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        load_var(path)


def test_truncated_safetensors(tmp_path, d2):
    var, _ = d2
    save_model(var, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_var(tmp_path / "cut.safetensors")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the protocol it then refuses
def test_pickled_objects_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(2), "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_var(tmp_path / "evil.pth")
    with open(tmp_path / "legacy.pth", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError):
        load_var(tmp_path / "legacy.pth")


def test_vae_given_as_var_and_var_given_as_vae():
    with pytest.raises(CheckpointError, match="is a VQVAE checkpoint, not a VAR"):
        load_var(PARITY / "vae_ch32v4096z32.pth")
    with pytest.raises(CheckpointError, match="is a VAR model, not a VQVAE"):
        load_vae(PARITY / "var_d2.pth")


def test_state_dict_of_something_else(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="neither a VAR nor a VQVAE"):
        load_var(tmp_path / "other.pth")


def test_tiny_model_is_deterministic():
    a, _ = load_var("tiny")
    b, _ = load_var("tiny")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert a.cfg.depth == 6 and a.cfg.num_classes == 10  # the trained reference model
