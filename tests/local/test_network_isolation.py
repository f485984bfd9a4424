"""Every sandbox has a network of its own: this machine's loopback is out of reach.

The attack (issue 22): a default sandbox shared the host's network, so against
a real ``prefect server start`` on 127.0.0.1 it read Secret blocks through
``/api/block_documents/filter``. Here a canary HTTP server on the host's
127.0.0.1 stands in for that API: a default sandbox cannot reach it, directly
or through the address pasta gives its gateway, and the canary logs nothing.
A sandbox whose ``PREFECT_API_URL`` names it (a flow run's sandbox) reaches
that port only, on its own loopback, where the server forwards it.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import modal
import pytest

from prefect_modal.local import LocalModal
from prefect_modal.local.api import context as context_mod
from prefect_modal.local.runtime.isolation import why_not_isolated
from prefect_modal.local.runtime.network import NO_PASTA_NOTICE

_WHY_NOT = why_not_isolated(True) if os.path.exists("/proc/self/ns/pid") else "no namespaces"
pytestmark = pytest.mark.skipif(
    _WHY_NOT is not None,
    reason=f"isolated sandboxes need Linux namespaces (as root, or user namespaces): {_WHY_NOT}",
)

PY = "python"

#: Tries each address; prints one JSON line {address: "reached <body>" | "failed <error>"}.
PROBE = r"""
import json, sys, urllib.request
out = {}
for url in sys.argv[1:]:
    try:
        body = urllib.request.urlopen(url, timeout=3).read().decode()
        out[url] = "reached " + body
    except Exception as exc:
        out[url] = "failed " + type(exc).__name__
print(json.dumps(out))
"""

#: The sandbox's default gateway (from its own routing table), or "" if it has none.
GATEWAY_FN = r"""
import socket, struct
def gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        f = line.split()
        if f[1] == "00000000" and f[0] != "lo":
            return socket.inet_ntoa(struct.pack("<I", int(f[2], 16)))
    return ""
"""


class Canary:
    """An HTTP server on the host's 127.0.0.1 that records every request it gets."""

    def __init__(self, body: str) -> None:
        self.requests: list[str] = []
        canary = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                canary.requests.append(self.path)
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def canaries() -> Iterator[tuple[Canary, Canary]]:
    """Two canaries: "the Prefect API" a flow run's sandbox may reach, and "another port"."""
    a, b = Canary("api-canary"), Canary("other-canary")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def app(local_modal: LocalModal) -> Any:
    return modal.App.lookup("network", create_if_missing=True, client=local_modal.client)


def _probe(lm: LocalModal, app: Any, urls: list[str], **kwargs: Any) -> tuple[dict[str, str], str]:
    sb = modal.Sandbox.create(PY, "-c", PROBE, *urls, app=app, client=lm.client, **kwargs)
    sb.wait()
    out, err = sb.stdout.read(), sb.stderr.read()
    assert sb.returncode == 0, err
    return json.loads(out), err


def _gateway(lm: LocalModal, app: Any) -> str:
    code = GATEWAY_FN + "print(gateway())"
    sb = modal.Sandbox.create(PY, "-c", code, app=app, client=lm.client)
    sb.wait()
    return str(sb.stdout.read().strip())


def test_a_default_sandbox_cannot_reach_the_hosts_loopback(
    local_modal: LocalModal, app: Any, canaries: tuple[Canary, Canary]
) -> None:
    """The attack: before, this sandbox read the canary (the host's Prefect API)."""
    canary, _ = canaries
    urls = [f"http://127.0.0.1:{canary.port}/secret", f"http://localhost:{canary.port}/secret"]
    gateway = _gateway(local_modal, app)
    if gateway:  # pasta's gateway: the real one, never mapped to the host's loopback
        urls.append(f"http://{gateway}:{canary.port}/secret")
    got, _ = _probe(local_modal, app, urls)
    assert set(got) == set(urls)
    assert all(v.startswith("failed") for v in got.values()), got
    assert canary.requests == []


def test_a_flow_run_sandbox_reaches_its_prefect_api_and_nothing_else(
    local_modal: LocalModal, app: Any, canaries: tuple[Canary, Canary]
) -> None:
    api, other = canaries
    api_url = f"http://localhost:{api.port}/api"
    sb = modal.Sandbox.create(
        PY,
        "-c",
        "import os; print(os.environ['PREFECT_API_URL'])",
        app=app,
        client=local_modal.client,
        env={"PREFECT_API_URL": api_url},
    )
    sb.wait()
    # rewritten to where the forward listens: "localhost" could mean ::1 inside
    assert sb.stdout.read().strip() == f"http://127.0.0.1:{api.port}/api"
    urls = [f"http://127.0.0.1:{api.port}/api/health", f"http://127.0.0.1:{other.port}/x"]
    got, _ = _probe(local_modal, app, urls, env={"PREFECT_API_URL": api_url})
    assert got == {urls[0]: "reached api-canary", urls[1]: got[urls[1]]}
    assert got[urls[1]].startswith("failed")
    assert api.requests == ["/api/health"]
    assert other.requests == []


def test_a_url_that_is_not_loopback_opens_no_port(
    local_modal: LocalModal, app: Any, canaries: tuple[Canary, Canary]
) -> None:
    """Only a loopback PREFECT_API_URL is forwarded; other variables never are."""
    canary, _ = canaries
    url = f"http://127.0.0.1:{canary.port}/x"
    got, _ = _probe(
        local_modal,
        app,
        [url],
        env={"PREFECT_API_URL": "https://api.prefect.cloud/api", "OTHER_URL": url},
    )
    assert got[url].startswith("failed")
    assert canary.requests == []


#: A DNS query (A record of example.com) to the first resolver of /etc/resolv.conf;
#: prints "answered" if an answer with its id came back, else why not.
DNS_QUERY = r"""
import socket
ns = next(l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver"))
q = bytes.fromhex("4a4b01000001000000000000") + b"\x07example\x03com\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET6 if ":" in ns else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
try:
    s.sendto(q, (ns, 53))
    print("answered" if s.recvfrom(512)[0][:2] == b"JK" else "wrong answer")
except OSError as e:
    print("failed", ns, e)
"""


def _run_here(code: str) -> str:
    """``code`` run by this test's own interpreter (on the host's network)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


@pytest.mark.skipif(
    shutil.which("pasta") is None, reason="outbound access needs pasta (Debian package passt)"
)
def test_a_default_sandbox_still_has_outbound_access(local_modal: LocalModal, app: Any) -> None:
    """Modal's default: a sandbox reaches the network beyond this machine (here, this
    machine's DNS resolver answers it through pasta), though not this machine's loopback."""
    resolv = Path("/etc/resolv.conf").read_text()
    ns = next((ln.split()[1] for ln in resolv.splitlines() if ln.startswith("nameserver")), "")
    if ipaddress.ip_address(ns or "127.0.0.1").is_loopback:
        pytest.skip(reason=f"this machine's DNS resolver ({ns or 'none'}) is on its loopback")
    here = _run_here(DNS_QUERY)
    if here != "answered":
        pytest.skip(reason=f"this machine's own DNS resolver does not answer it ({here})")
    sb = modal.Sandbox.create(PY, "-c", DNS_QUERY, app=app, client=local_modal.client)
    sb.wait()
    assert sb.stdout.read().strip() == "answered"


def test_without_pasta_sandboxes_have_loopback_and_say_so(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    canaries: tuple[Canary, Canary],
) -> None:
    """A pip-only install (no passt): announced at start and in each sandbox's log;
    forwarded ports still work (the server relays them, not pasta)."""
    monkeypatch.setattr(context_mod, "pasta", lambda: None)  # this machine without passt
    api, other = canaries
    with caplog.at_level(logging.WARNING, logger="prefect_modal.local"):
        lm = LocalModal(state_dir=tmp_path / "local-modal").start()
    try:
        assert any("apt-get install passt" in r.getMessage() for r in caplog.records)
        app = modal.App.lookup("no-pasta", create_if_missing=True, client=lm.client)
        urls = [f"http://127.0.0.1:{api.port}/api/ok", f"http://127.0.0.1:{other.port}/x"]
        got, err = _probe(lm, app, urls, env={"PREFECT_API_URL": f"http://127.0.0.1:{api.port}"})
        assert NO_PASTA_NOTICE.strip() in err
        assert got[urls[0]] == "reached api-canary" and got[urls[1]].startswith("failed")
        sb = modal.Sandbox.create("cat", "/proc/net/route", app=app, client=lm.client)
        sb.wait()
        assert {line.split()[0] for line in sb.stdout.read().splitlines()[1:]} <= {"lo"}
        assert other.requests == []
    finally:
        lm.stop()


def test_a_sandbox_given_this_servers_url_reaches_it_with_the_modal_client(
    local_modal: LocalModal, app: Any
) -> None:
    """A per-step flow run's sandbox starts its tasks' sandboxes: its MODAL_SERVER_URL
    (this server's) is forwarded, as the blob endpoint its uploads go to."""
    code = (
        "import modal\n"
        "client = modal.Client.from_env()\n"
        "inner_app = modal.App.lookup('network', client=client)\n"
        "sb = modal.Sandbox.create('echo', 'from inside', app=inner_app, client=client)\n"
        "sb.wait()\n"
        "print(sb.stdout.read().strip())\n"
    )
    outer = modal.Sandbox.create(
        PY, "-c", code, app=app, client=local_modal.client, env=dict(local_modal.env)
    )
    outer.wait()
    assert outer.stdout.read().strip() == "from inside", outer.stderr.read()
