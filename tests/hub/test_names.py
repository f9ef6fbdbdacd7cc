"""Names of Hub models and files."""

import pytest

from actvar_cli.errors import HubError
from actvar_cli.hub.download import DownloadTarget, parse_target


def test_parse_target():
    assert parse_target("d16") == DownloadTarget("FoundationVision/var", "var_d16.pth")
    assert parse_target("VAR_D30") == DownloadTarget("FoundationVision/var", "var_d30.pth")
    assert parse_target("vae") == DownloadTarget("FoundationVision/var", "vae_ch160v4096z32.pth")
    assert parse_target("me/actvar-d16") == DownloadTarget("me/actvar-d16", None)
    assert parse_target("me/actvar-d16:model.safetensors") == DownloadTarget("me/actvar-d16", "model.safetensors")
    for bad in ("me/my model", "nobody", "a/b/c", "/x", "me/"):
        with pytest.raises(HubError):
            parse_target(bad)
