"""Image build steps run in a build sandbox, never on this machine (issue 22, item 9).

An sdist's build backend is the package's own code: ``pip_install`` of one must
run it where Modal's build runs it, in the image's container. Here a real index
on 127.0.0.1 serves an sdist whose in-tree backend tries to write a canary file
on the host, to read a host file and a variable of the server's environment;
the real modal client builds an image that installs it, and a sandbox of that
image imports it.
"""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

import modal
import pytest

from prefect_modal.local import LocalModal
from prefect_modal.local.build import pip

from .https_index import https_index
from .test_build_trust import TRUST_SETTINGS

#: An in-tree PEP 517 backend (``backend-path``): it needs nothing from the index.
#: Building the wheel it writes ``CANARY`` and reads ``SECRET`` (host paths), and
#: the module it installs says what it read.
_BACKEND = """
import base64, hashlib, os, zipfile

NAME, VERSION = {name!r}, "0.1.0"
CANARY, SECRET = {canary!r}, {secret!r}


def _attack():
    try:
        os.makedirs(os.path.dirname(CANARY), exist_ok=True)
        with open(CANARY, "w") as f:
            f.write("written by a build backend")
    except OSError:
        pass
    try:
        with open(SECRET) as f:
            read = f.read()
    except OSError:
        read = "unreadable"
    return read + "|" + os.environ.get("PM_SERVER_SECRET", "no-env")


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    read = _attack()
    dist = f"{{NAME}}-{{VERSION}}.dist-info"
    meta = f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n"
    wheel_info = "Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    files = {{
        f"{{NAME}}/__init__.py": f"READ = {{read!r}}\\n".encode(),
        f"{{dist}}/METADATA": meta.encode(),
        f"{{dist}}/WHEEL": wheel_info.encode(),
    }}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{{path}},sha256={{digest}},{{len(data)}}")
    record.append(f"{{dist}}/RECORD,,")
    files[f"{{dist}}/RECORD"] = ("\\n".join(record) + "\\n").encode()
    wheel = f"{{NAME}}-{{VERSION}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel
"""


def _sdist(directory: Path, name: str, canary: Path, secret: Path) -> Path:
    top = f"{name}-0.1.0"
    members = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n",
        "pyproject.toml": (
            '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
        ),
        "backend.py": _BACKEND.format(name=name, canary=str(canary), secret=str(secret)),
    }
    path = directory / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def isolated(local_modal: LocalModal) -> LocalModal:
    if local_modal.isolation is None:
        pytest.skip(reason=f"needs isolated sandboxes: {local_modal.not_isolated_because}")
    return local_modal


def test_an_sdists_build_backend_runs_in_the_build_sandbox_not_on_the_host(
    isolated: LocalModal, app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = modal.Image.debian_slim()
    project = f"pmsd{uuid.uuid4().hex[:12]}"
    canary = tmp_path / "host" / "canary-written-by-backend"
    secret = tmp_path / "host-secret.txt"
    secret.write_text(f"secret-{uuid.uuid4().hex}")
    before = secret.read_text()
    sdist = _sdist(tmp_path, project, canary, secret)
    with https_index(tmp_path, project, sdist) as index:
        for name in TRUST_SETTINGS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("PIP_CERT", str(index.ca_file))  # bound into the build sandbox
        monkeypatch.setenv("PM_SERVER_SECRET", "a-token-of-the-servers")  # never passed in
        image = base.pip_install(f"{project}==0.1.0", index_url=index.url)
        sb = modal.Sandbox.create(
            "python", "-c", f"import {project}; print({project}.READ)",
            app=app, client=isolated.client, image=image,
        )  # fmt: skip
        sb.wait(raise_on_termination=False)
        out, err = sb.stdout.read().strip(), sb.stderr.read()
    # the package built and installed, and it imports in a sandbox of the image
    assert sb.returncode == 0, err
    # its backend neither read the host's file nor the server's environment, nor wrote
    # on the host
    assert out == "unreadable|no-env"
    assert not canary.exists() and not canary.parent.exists()
    assert secret.read_text() == before


def test_run_commands_after_apt_install_keep_the_apt_layers_files(
    isolated: LocalModal, app: Any
) -> None:
    from .test_apt_layer import _needs_mirror

    _needs_mirror()
    # GNU hello: small, and not on the host (else the host's /usr/bin/hello would
    # stand in for the layer's)
    assert not Path("/usr/bin/hello").exists(), "this test needs a host without GNU hello"
    marker = uuid.uuid4().hex[:12]
    image = (
        modal.Image.debian_slim().apt_install("hello").run_commands(f"mkdir -p /opt/pm-{marker}")
    )
    sb = modal.Sandbox.create(
        "sh", "-c", f"test -d /opt/pm-{marker} && hello",
        app=app, client=isolated.client, image=image,
    )  # fmt: skip
    sb.wait(raise_on_termination=False)
    out, err = sb.stdout.read(), sb.stderr.read()
    assert sb.returncode == 0, (out, err)
    assert out == "Hello, world!\n", out


def test_run_commands_change_usr_and_etc_as_on_modal_and_never_the_hosts(
    isolated: LocalModal, app: Any
) -> None:
    marker = uuid.uuid4().hex[:12]
    image = (
        modal.Image.debian_slim()
        .run_commands(
            f"echo {marker} > /etc/pm-run-{marker}",
            f"mkdir -p /usr/local/share/pm-{marker} /opt/pm-{marker}",
            f"echo gone > /opt/pm-{marker}/f",
            # a host file removed (a whiteout), a host directory replaced (opaque)
            "rm /usr/bin/tac",
            "rm -r /usr/share/zoneinfo/Europe && mkdir /usr/share/zoneinfo/Europe "
            "&& touch /usr/share/zoneinfo/Europe/pm",
        )
        .run_commands(f"rm /opt/pm-{marker}/f")
    )
    sb = modal.Sandbox.create(
        "sh", "-c",
        f"cat /etc/pm-run-{marker} && test -d /usr/local/share/pm-{marker} "
        f"&& test ! -e /opt/pm-{marker}/f && test ! -e /usr/bin/tac "
        '&& test "$(ls /usr/share/zoneinfo/Europe)" = pm && echo ok',
        app=app, client=isolated.client, image=image,
    )  # fmt: skip
    sb.wait(raise_on_termination=False)
    out, err = sb.stdout.read(), sb.stderr.read()
    assert sb.returncode == 0, (out, err)
    assert out.split() == [marker, "ok"], out
    # the host's /etc and /usr are untouched
    assert not Path(f"/etc/pm-run-{marker}").exists()
    assert not Path(f"/usr/local/share/pm-{marker}").exists()
    assert Path("/usr/bin/tac").exists() and Path("/usr/share/zoneinfo/Europe/Paris").exists()


def test_a_build_sandbox_gets_uvs_settings_and_proxies_but_no_other_variable(
    tmp_path: Path,
) -> None:
    venv, scratch, cache = tmp_path / "venv", tmp_path / "ctx", tmp_path / "uv-cache"
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a real bundle")
    environ = {
        "UV_INDEX_URL": "https://index.example/simple",
        "HTTPS_PROXY": "http://proxy.example:3128",
        "PREFECT_API_KEY": "pnu_secret",
        "MODAL_TOKEN_SECRET": "as-secret",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "UV_CACHE_DIR": "/host/cache",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_CERT": str(bundle),
        "HOME": str(tmp_path),
    }
    plan = pip.sandboxed_install(
        venv, ["-r", "/reqs.txt"], {"/reqs.txt": "six\n"}, scratch, cache, environ
    )
    assert plan.env["UV_INDEX_URL"] == environ["UV_INDEX_URL"]
    assert plan.env["HTTPS_PROXY"] == environ["HTTPS_PROXY"]
    assert not {"PREFECT_API_KEY", "MODAL_TOKEN_SECRET", "AWS_SECRET_ACCESS_KEY"} & set(plan.env)
    assert plan.env["UV_CACHE_DIR"] == pip.UV_CACHE_AT and plan.rw[pip.UV_CACHE_AT] == cache
    assert plan.env["SSL_CERT_FILE"] == pip.CERT_FILE_AT and plan.ro[pip.CERT_FILE_AT] == bundle
    assert plan.argv[0] == pip.UV_AT and plan.ro[pip.UV_AT].name == "uv"
    assert plan.rw[str(venv)] == venv
    # no uv configuration here: none bound; the user's uv.toml: bound where uv finds it
    assert pip.UV_USER_CONFIG_AT not in plan.ro
    (tmp_path / ".config/uv").mkdir(parents=True)
    (tmp_path / ".config/uv/uv.toml").write_text('index-url = "https://index.example/simple"\n')
    plan = pip.sandboxed_install(venv, ["six"], {}, scratch, cache, environ)
    assert plan.ro[pip.UV_USER_CONFIG_AT] == tmp_path / ".config/uv/uv.toml"
    assert "UV_CONFIG_FILE" not in plan.env  # merged with the system's, as uv does here
    plan = pip.sandboxed_install(
        venv, ["-r", "/reqs.txt"], {"/reqs.txt": "six\n"}, scratch, cache, environ
    )
    # the requirements file is written to the scratch directory, bound read-only
    req = plan.argv[plan.argv.index("-r") + 1]
    assert Path(req).read_text() == "six\n" and plan.ro[str(scratch)] == scratch


def test_without_a_build_sandbox_the_build_log_says_uv_runs_on_this_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No silent fallback: a server that cannot isolate says, in the build log, that
    a package's build code runs here."""
    with LocalModal(state_dir=tmp_path / "lm", isolation=False) as lm:
        app = modal.App.lookup(
            f"t-{uuid.uuid4().hex[:10]}", create_if_missing=True, client=lm.client
        )
        marker = uuid.uuid4().hex[:8]
        image = modal.Image.debian_slim().env({"PM_MARKER": marker}).pip_install("six")
        with modal.enable_output():
            sb = modal.Sandbox.create("true", app=app, client=lm.client, image=image)
            sb.wait(raise_on_termination=False)
    assert sb.returncode == 0
    out = capsys.readouterr().out
    assert "no build sandbox" in out and "uv runs on this machine as" in out, out


def test_a_build_sandboxs_uv_reads_the_users_uv_toml(
    isolated: LocalModal, app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index named only in ``~/.config/uv/uv.toml`` (as uv on this machine reads
    it) is the one the build sandbox installs from."""
    from .https_index import build_wheel

    base = modal.Image.debian_slim()
    project = f"pmcfg{uuid.uuid4().hex[:12]}"
    marker = uuid.uuid4().hex
    wheel = build_wheel(tmp_path, project, "0.1.0", f"MARKER = {marker!r}\n")
    with https_index(tmp_path, project, wheel) as index:
        for name in TRUST_SETTINGS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("PIP_CERT", str(index.ca_file))
        home = Path(os.environ["HOME"])
        (home / ".config/uv").mkdir(parents=True)
        (home / ".config/uv/uv.toml").write_text(f'index-url = "{index.url}"\n')
        image = base.pip_install(f"{project}==0.1.0")
        sb = modal.Sandbox.create(
            "python", "-c", f"import {project}; print({project}.MARKER)",
            app=app, client=isolated.client, image=image,
        )  # fmt: skip
        sb.wait(raise_on_termination=False)
        assert (sb.returncode, sb.stdout.read().strip()) == (0, marker), sb.stderr.read()


def test_a_build_step_cannot_reach_this_machines_loopback(isolated: LocalModal, app: Any) -> None:
    """A build step runs on a network of its own (issue 22): a canary HTTP server on this
    machine's 127.0.0.1 (a Prefect server's Secret blocks, say) gets no request from a
    ``run_commands`` step; the step still builds, and says what it met."""
    import http.server
    import threading

    hits: list[str] = []

    class Canary(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"canary")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canary)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        probe = (
            "import urllib.request\n"
            "try:\n"
            f"    urllib.request.urlopen('http://127.0.0.1:{port}/secret', timeout=5)\n"
            "    what = 'reached'\n"
            "except OSError as exc:\n"
            "    what = 'unreachable ' + type(exc).__name__\n"
            "open('/probe-result', 'w').write(what)\n"
        )
        image = modal.Image.debian_slim().run_commands(f"python3 -c {_quote(probe)}")
        sb = modal.Sandbox.create(
            "cat", "/probe-result", app=app, client=isolated.client, image=image
        )
        sb.wait(raise_on_termination=False)
        out, err = sb.stdout.read(), sb.stderr.read()
        assert sb.returncode == 0, (out, err)
        assert out.startswith("unreachable"), out
        assert hits == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
