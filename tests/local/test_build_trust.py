"""Image builds trust the certificates pip trusts on this machine.

On a machine whose TLS is intercepted, pip works because its configuration
(``PIP_CERT``, ``cert`` in pip.conf) names the CA bundle; uv, which builds the
local server's images, trusts only its bundled roots unless told. Here a real
index on 127.0.0.1 serves a wheel over HTTPS with a certificate from a CA made
for the test, named only where pip looks for it; the real modal client builds
an image that installs from it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import modal
import pytest

from prefect_modal.local import LocalModal
from prefect_modal.local.build import trust

from .https_index import build_wheel, https_index

#: Every setting that would tell uv or pip what to trust, besides the one under test.
TRUST_SETTINGS = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "PIP_CERT",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    *trust.UV_SYSTEM_CERTS_VARIABLES,
)


@pytest.fixture
def isolated(local_modal: LocalModal) -> LocalModal:
    if local_modal.isolation is None:
        pytest.skip(reason=f"needs isolated sandboxes: {local_modal.not_isolated_because}")
    return local_modal


@pytest.mark.parametrize("where", ["PIP_CERT", "pip.conf"])
def test_a_build_installs_from_an_index_whose_ca_only_pip_is_told_of(
    isolated: LocalModal, app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # The base image comes from the machine's own index, with the machine's trust settings.
    base = modal.Image.debian_slim()
    first = modal.Sandbox.create("true", app=app, client=isolated.client, image=base)
    first.wait(raise_on_termination=False)
    assert first.returncode == 0

    project = f"pmtls{uuid.uuid4().hex[:12]}"
    marker = uuid.uuid4().hex
    wheel = build_wheel(tmp_path, project, "0.1.0", f"MARKER = {marker!r}\n")
    with https_index(tmp_path, project, wheel) as index:
        for name in TRUST_SETTINGS:
            monkeypatch.delenv(name, raising=False)
        if where == "PIP_CERT":
            monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no pip.conf of the machine's
            monkeypatch.setenv("PIP_CERT", str(index.ca_file))
        else:
            conf = tmp_path / "pip.conf"
            conf.write_text(f"[global]\ncert = {index.ca_file}\n")
            monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))

        image = base.pip_install(f"{project}==0.1.0", index_url=index.url)
        sb = modal.Sandbox.create(
            "python", "-c", f"import {project}; print({project}.MARKER)",
            app=app, client=isolated.client, image=image,
        )  # fmt: skip
        sb.wait(raise_on_termination=False)
        assert (sb.returncode, sb.stdout.read().strip()) == (0, marker), sb.stderr.read()


def test_uv_is_told_what_pip_trusts_and_its_own_setting_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\ncert = /from/global.pem\n[install]\ncert = /from/install.pem\n")
    none = {"PIP_CONFIG_FILE": os.devnull, "HOME": str(tmp_path)}
    assert trust.uv_trust_env({**none, "PIP_CERT": "/ca.pem"}) == {"SSL_CERT_FILE": "/ca.pem"}
    # pip's order: the install section over global, the environment over both
    from_conf = {"PIP_CONFIG_FILE": str(conf), "HOME": str(tmp_path)}
    assert trust.uv_trust_env(from_conf) == {"SSL_CERT_FILE": "/from/install.pem"}
    assert trust.uv_trust_env({**from_conf, "PIP_CERT": "/env.pem"}) == {
        "SSL_CERT_FILE": "/env.pem"
    }
    # pip's bundle over a machine-wide SSL_CERT_FILE, as pip itself prefers its own
    assert trust.uv_trust_env({**none, "PIP_CERT": "/p.pem", "SSL_CERT_FILE": "/s.pem"}) == {
        "SSL_CERT_FILE": "/p.pem"
    }
    # uv's own setting: left alone; SSL_CERT_FILE without pip's: uv reads it itself
    assert trust.uv_trust_env({**from_conf, "UV_SYSTEM_CERTS": "1"}) == {}
    assert trust.uv_trust_env({**none, "SSL_CERT_FILE": "/s.pem"}) == {}
    # nothing configured: the system store, if this machine has one
    monkeypatch.setattr(trust, "_system_store_exists", lambda: True)
    assert trust.uv_trust_env(none) in ({"UV_SYSTEM_CERTS": "1"}, {"UV_NATIVE_TLS": "1"})
    monkeypatch.setattr(trust, "_system_store_exists", lambda: False)
    assert trust.uv_trust_env(none) == {}
