"""Tunnels as Modal gives them, through plain clients nobody here wrote.

On Modal a tunnel is ``https://<host>`` on port 443 with a certificate every
client trusts (https://modal.com/docs/guide/tunnels), so ``urlopen(tunnel.url)``,
``requests.get(f"https://{tunnel.host}/")`` and a WebSocket through it work with
no flags. Locally the embedded server makes its process trust its CA
(``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE``), and ``local serve`` prints the same
variables for other processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import modal
import pytest
import requests
import websockets.sync.client

from prefect_modal.local import LocalModal, make_client
from prefect_modal.local.runtime import tls
from prefect_modal.local.runtime.tunnel_hosts import TUNNEL_PORT, bind_tunnel_host

from .serve_process import start_serve
from .test_tunnels_probes import echo_sandbox, free_port, may_bind_443, tunnel_authority

pytestmark = pytest.mark.timeout(120)

# A WebSocket echo server with the standard library only (the sandbox has no websockets
# package): RFC 6455's handshake, then each text frame from the client is sent back.
WS_ECHO_SERVER = r"""
import base64, hashlib, socket, struct, sys, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def recv_exact(c, n):
    b = b""
    while len(b) < n:
        chunk = c.recv(n - len(b))
        if not chunk:
            raise EOFError
        b += chunk
    return b
def serve(c):
    head = b""
    while b"\r\n\r\n" not in head:
        head += c.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")
           if l.lower().startswith(b"sec-websocket-key:")][0]
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    try:
        while True:
            b0, b1 = recv_exact(c, 2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", recv_exact(c, 2))[0]
            elif n == 127:
                n = struct.unpack(">Q", recv_exact(c, 8))[0]
            mask = recv_exact(c, 4)
            data = bytes(x ^ mask[i % 4] for i, x in enumerate(recv_exact(c, n)))
            if b0 & 0x0F == 8:
                c.sendall(b"\x88\x00")
                return
            reply = b"echo:" + data
            c.sendall(bytes([0x81, len(reply)]) + reply)
    except EOFError:
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""


def _certs(path: str | Path) -> set[bytes]:
    return set(
        re.findall(
            rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
            Path(path).read_bytes(),
            re.S,
        )
    )


def test_plain_clients_reach_a_tunnel_without_flags(local_modal: LocalModal, app: Any) -> None:
    port = free_port()
    sb = echo_sandbox(local_modal, app, port, encrypted_ports=[port])
    sb.wait_until_ready(timeout=30)
    t = sb.tunnels()[port]
    # port 443 and a URL without it, as on Modal, where this user may bind 443; else the
    # announced high port (docs/local-server.md)
    authority = tunnel_authority(t)
    # urllib's default context, as Modal's sandbox-pool example uses it
    with urllib.request.urlopen(t.url + "/u", timeout=10) as resp:
        assert json.loads(resp.read())["sandbox"] == sb.object_id
    # https://{tunnel.host}/ as smolagents' ModalExecutor builds it (with the port where
    # the tunnel is on a high one)
    r = requests.get(f"https://{authority}/r", timeout=10)
    assert r.status_code == 200 and r.json()["path"] == "/r"
    assert httpx.get(f"{t.url}/h", timeout=10).json()["path"] == "/h"
    sb.terminate()


def test_a_websocket_through_a_tunnel(local_modal: LocalModal, app: Any) -> None:
    port = free_port()
    sb = modal.Sandbox.create(
        "python",
        "-c",
        WS_ECHO_SERVER,
        str(port),
        app=app,
        client=local_modal.client,
        encrypted_ports=[port],
        readiness_probe=modal.Probe.with_tcp(port),
    )
    sb.wait_until_ready(timeout=30)
    t = sb.tunnels()[port]
    authority = tunnel_authority(t)  # host (port 443), or host:port where 443 may not be bound
    with websockets.sync.client.connect(f"wss://{authority}/ws", open_timeout=10) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "echo:hello"
        ws.send("again")
        assert ws.recv(timeout=10) == "echo:again"
    sb.terminate()


def test_the_embedded_server_trusts_its_ca_in_its_process_and_restores(tmp_path: Path) -> None:
    before = {v: os.environ.get(v) for v in tls.TRUST_VARIABLES}
    lm = LocalModal(state_dir=tmp_path / "lm").start()
    try:
        bundle = os.environ["SSL_CERT_FILE"]
        assert os.environ["REQUESTS_CA_BUNDLE"] == bundle
        certs = _certs(bundle)
        assert _certs(lm.tls_cert) <= certs  # ours
        system = ssl.get_default_verify_paths().openssl_cafile
        if before["SSL_CERT_FILE"] and Path(before["SSL_CERT_FILE"]).is_file():
            system = before["SSL_CERT_FILE"]
        assert _certs(system) <= certs  # and still this machine's, for every other site
    finally:
        lm.stop()
    assert {v: os.environ.get(v) for v in tls.TRUST_VARIABLES} == before


def test_the_embedded_server_can_leave_the_environment_alone(tmp_path: Path) -> None:
    before = {v: os.environ.get(v) for v in tls.TRUST_VARIABLES}
    with LocalModal(state_dir=tmp_path / "lm", trust_env=False) as lm:
        assert {v: os.environ.get(v) for v in tls.TRUST_VARIABLES} == before
        assert lm.trust_env == dict.fromkeys(tls.TRUST_VARIABLES, str(lm.trust_bundle))


def test_local_serve_prints_the_trust_variables(tmp_path: Path) -> None:
    """Another process, with only what `local serve` printed, reaches a tunnel."""
    state, home = tmp_path / "state", tmp_path / "home"
    home.mkdir()
    proc, exports, _ = start_serve(state)
    try:
        bundle = state / "tls" / "trust-bundle.pem"
        assert exports["SSL_CERT_FILE"] == exports["REQUESTS_CA_BUNDLE"] == str(bundle)
        assert _certs(state / "tls" / "ca.pem") <= _certs(bundle)
        client = make_client(
            exports["MODAL_SERVER_URL"], exports["MODAL_TOKEN_ID"], exports["MODAL_TOKEN_SECRET"]
        )
        app = modal.App.lookup("trust-vars", create_if_missing=True, client=client)
        port = free_port()
        sb = modal.Sandbox.create(
            "python",
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            app=app,
            client=client,
            encrypted_ports=[port],
            readiness_probe=modal.Probe.with_tcp(port),
        )
        sb.wait_until_ready(timeout=30)
        t = sb.tunnels()[port]
        # `local serve` runs as this user: host (port 443), or host:port where 443 may not be
        # bound
        authority = tunnel_authority(t)
        code = textwrap.dedent(
            f"""
            import urllib.request, requests
            print(urllib.request.urlopen({t.url!r}, timeout=10).status)
            print(requests.get("https://{authority}/", timeout=10).status_code)
            """
        )
        env = {"PATH": os.environ["PATH"], "HOME": str(home), **exports}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.stdout.split() == ["200", "200"], out.stderr
        # without the variables, the same client refuses the certificate
        bare = {"PATH": os.environ["PATH"], "HOME": str(home)}
        refused = subprocess.run(
            [sys.executable, "-c", code], env=bare, capture_output=True, text=True, timeout=60
        )
        assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr
        sb.terminate()
        client.close()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


NOT_ROOT = "needs root to start a server as an unprivileged user (setpriv)"
LOW_PORTS_OPEN = "every user may bind port 443 on this machine, so there is no fallback to see"
LOW_PORT_ALLOWED = "this user may bind port 443 (as root does), so there is no fallback to see"

AS_NOBODY = r"""
import os, sys, urllib.request
import modal
from prefect_modal.local import LocalModal
port = int(sys.argv[1])
with LocalModal(isolation=False, fork_server=False, image_cache=sys.argv[2]) as lm:
    app = modal.App.lookup("nobody", create_if_missing=True, client=lm.client)
    sb = modal.Sandbox.create(
        "python", "-m", "http.server", str(port), "--bind", "127.0.0.1", app=app,
        client=lm.client, encrypted_ports=[port], readiness_probe=modal.Probe.with_tcp(port),
    )
    sb.wait_until_ready(timeout=30)
    t = sb.tunnels()[port]
    print("URL", t.url, t.port)
    print("STATUS", urllib.request.urlopen(t.url, timeout=10).status)
    sb.terminate()
    sys.stdout.write(sb.stderr.read())
"""


def test_a_server_that_may_not_bind_443_falls_back_and_says_so() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip(reason=NOT_ROOT)
    if _unprivileged_port_start() <= 443:
        pytest.skip(reason=LOW_PORTS_OPEN)
    # pytest's tmp_path lives under a 0700 directory of root's: nobody needs its own
    with tempfile.TemporaryDirectory(prefix="prefect-modal-nobody-") as top:
        os.chmod(top, 0o755)
        home = Path(top) / "home"
        home.mkdir()
        os.chown(home, 65534, 65534)
        _run_as_nobody(home)


def _run_as_nobody(home: Path) -> None:
    script = home / "run.py"
    script.write_text(AS_NOBODY)
    out = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            str(script),
            str(free_port()),
            str(home / "images"),
        ],
        env={"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(home)},
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stderr
    url_line = next(line for line in out.stdout.splitlines() if line.startswith("URL "))
    _, url, port = url_line.split()
    assert int(port) != 443 and url.endswith(f":{port}")
    assert "STATUS 200" in out.stdout  # still trusted: the process trusts the server's CA
    # never silently: the sandbox's log says why, and how to get 443
    assert "the tunnel of port" in out.stdout and "not port 443 as on Modal" in out.stdout
    assert "CAP_NET_BIND_SERVICE" in out.stdout


def test_bind_tunnel_host_skips_an_address_in_use() -> None:
    # where this user may not bind 443, no address's 443 can be seen taken (the kernel
    # refuses the port first, and the server falls back to a free high port of the same
    # address): the same skip is shown on a port this user may bind
    port = TUNNEL_PORT if may_bind_443() else free_port()
    first = bind_tunnel_host("127.0.0.1", port=port)
    try:
        first.sock.listen()
        assert first.port == port and first.fallback is None
        again = bind_tunnel_host("127.0.0.1", known=[first.host], port=port)
        try:
            assert again.host != first.host  # its port is taken: another address
            assert again.port == port and again.fallback is None
        finally:
            again.sock.close()
    finally:
        first.sock.close()


def test_bind_tunnel_host_falls_back_to_a_high_port_and_says_why() -> None:
    if may_bind_443():
        pytest.skip(reason=LOW_PORT_ALLOWED)
    bound = bind_tunnel_host("127.0.0.1")
    try:
        assert bound.host != "127.0.0.1" and bound.port not in (0, TUNNEL_PORT)
        assert bound.sock.getsockname() == (bound.host, bound.port)
        assert bound.fallback is not None and "may not bind port 443" in bound.fallback
        assert "CAP_NET_BIND_SERVICE" in bound.fallback
    finally:
        bound.sock.close()


def test_a_copied_trust_variable_still_names_a_bundle_after_the_stop(tmp_path: Path) -> None:
    """A value copied while a server ran (a test's monkeypatch undoing after the server
    stopped, a child's environment) still names a file with this machine's CAs."""
    lm = LocalModal(state_dir=tmp_path / "lm").start()
    copied = os.environ["SSL_CERT_FILE"]
    lm.stop()
    assert Path(copied).is_file()
    assert _certs(lm.tls_cert).isdisjoint(_certs(copied)) or len(tls.ProcessTrust._active) > 0
    ssl.create_default_context(cafile=copied)  # loads: not empty, not missing
