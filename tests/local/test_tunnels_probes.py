"""Tunnels, connect tokens and readiness probes, through the real modal client (V1 and V2)."""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any

import certifi
import modal
import modal.exception
import pytest

from prefect_modal.local import LocalModal

from .conftest import assert_backend

pytestmark = pytest.mark.timeout(90)

# A sandbox web server that answers every GET with who it is and what it was sent.
ECHO_SERVER = r"""
import http.server, json, os, sys, time
time.sleep(float(sys.argv[2]))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"sandbox": os.environ["MODAL_SANDBOX_ID"], "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def may_bind_443() -> bool:
    """Whether this user may bind port 443 (root, ``CAP_NET_BIND_SERVICE``, or
    ``net.ipv4.ip_unprivileged_port_start`` at 443 or less), asked of the kernel, not of
    the server. A server this user starts puts its tunnels there then, as Modal does;
    else each tunnel listens on a free high port of its own address, the URL carries it,
    and the sandbox's log says so (docs/local-server.md, 'Port 443 needs privileges')."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 443))
        except PermissionError:
            return False
        except OSError as exc:
            # the kernel checks the privilege before whether the port is taken
            if exc.errno != errno.EADDRINUSE:
                raise
    return True


def tunnel_authority(t: Any) -> str:
    """``host[:port]`` of a tunnel as the server promises it to this user: its own
    address on port 443, so the URL has no port (as on Modal), where this user may bind
    443; else the high port the server announced, which the URL then carries."""
    if may_bind_443():
        assert t.port == 443 and t.url == f"https://{t.host}"
        return str(t.host)
    assert t.port != 443 and t.url == f"https://{t.host}:{t.port}"
    return f"{t.host}:{t.port}"


def fallback_note(port: int, url: str) -> str:
    """What the sandbox's log says of a tunnel on a high port (this user may not bind 443)."""
    return f"the tunnel of port {port} is {url}, not port 443 as on Modal"


def tls_context(lm: LocalModal) -> ssl.SSLContext:
    """A client context that trusts the local server's certificate, and nothing else."""
    return ssl.create_default_context(cafile=str(lm.tls_cert))


def get(url: str, lm: LocalModal, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, context=tls_context(lm), timeout=10) as resp:
        return json.loads(resp.read())


def echo_sandbox(lm: LocalModal, app: Any, port: int, delay: float = 0.0, **kw: Any) -> Any:
    kw.setdefault("readiness_probe", modal.Probe.with_tcp(port))
    return modal.Sandbox.create(
        "python", "-c", ECHO_SERVER, str(port), str(delay), app=app, client=lm.client, **kw
    )


def sandbox_netns_available(lm: LocalModal) -> bool:
    """Whether each sandbox has its own network namespace (its ports are its own)."""
    return getattr(lm, "isolation", None) is not None


def test_tunnel_url_serves_the_sandboxes_http_server(
    local_modal: LocalModal, app: Any, backend: str
) -> None:
    port = free_port()
    sb = modal.Sandbox.create(
        "sh",
        "-c",
        f"echo served-by-$MODAL_SANDBOX_ID > index.html && "
        f"exec python -m http.server {port} --bind 127.0.0.1",
        app=app,
        client=local_modal.client,
        encrypted_ports=[port],
        readiness_probe=modal.Probe.with_tcp(port),
    )
    assert_backend(sb.object_id, backend)
    sb.wait_until_ready(timeout=30)
    tunnels = sb.tunnels()
    assert list(tunnels) == [port]
    t = tunnels[port]
    # as on Modal: a host of its own, port 443, so the URL has no port (where this user
    # may bind 443; else a high port, which the URL carries)
    assert ipaddress.ip_address(t.host) in ipaddress.ip_network("127.0.0.0/8")
    assert t.host != "127.0.0.1"
    tunnel_authority(t)
    with pytest.raises(modal.exception.InvalidError):
        _ = t.tcp_socket  # encrypted only, as on Modal
    with urllib.request.urlopen(
        t.url + "/index.html", context=tls_context(local_modal), timeout=10
    ) as resp:
        assert resp.read() == f"served-by-{sb.object_id}\n".encode()
    # the certificate is signed by the server's CA: a client that trusts only certifi's
    # public CAs refuses it
    public_only = ssl.create_default_context(cafile=certifi.where())
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(t.url + "/index.html", context=public_only, timeout=10)
    sb.terminate()
    if not may_bind_443():  # never silently: the sandbox's log says why, and how to get 443
        log = sb.stderr.read()
        assert fallback_note(port, t.url) in log and "CAP_NET_BIND_SERVICE" in log


def test_unencrypted_and_h2_ports(local_modal: LocalModal, app: Any, backend: str) -> None:
    plain_port, h2_port = free_port(), free_port()
    sb = echo_sandbox(
        local_modal, app, plain_port, unencrypted_ports=[plain_port], h2_ports=[h2_port]
    )
    sb.wait_until_ready(timeout=30)
    tunnels = sb.tunnels()
    assert set(tunnels) == {plain_port, h2_port}
    host, tcp_port = tunnels[plain_port].tcp_socket
    assert host == tunnels[plain_port].host and tcp_port != 443  # Modal's is a random port
    with socket.create_connection((host, tcp_port), timeout=10) as s:
        s.sendall(b"GET /plain HTTP/1.0\r\nHost: x\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.0 200")
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert body["sandbox"] == sb.object_id and body["path"] == "/plain"
    # an unencrypted port has the TLS endpoint too, as on Modal
    tls_host, tls_port = tunnels[plain_port].tls_socket
    assert tls_host == host and (tls_port == 443) == may_bind_443() and tls_port != tcp_port
    assert get(f"https://{tls_host}:{tls_port}/tls", local_modal)["path"] == "/tls"
    # an h2 port negotiates HTTP/2 by ALPN
    ctx = tls_context(local_modal)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    h2_host, h2_tls_port = tunnels[h2_port].tls_socket
    with socket.create_connection((h2_host, h2_tls_port), timeout=10) as raw_sock:
        with ctx.wrap_socket(raw_sock, server_hostname=h2_host) as tls_sock:
            assert tls_sock.selected_alpn_protocol() == "h2"
    assert (h2_tls_port == 443) == may_bind_443()
    sb.terminate()
    if not may_bind_443():
        log = sb.stderr.read()
        assert fallback_note(plain_port, f"https://{tls_host}:{tls_port}") in log
        assert fallback_note(h2_port, f"https://{h2_host}:{h2_tls_port}") in log


def test_two_sandboxes_each_reach_their_own_port(local_modal: LocalModal, app: Any) -> None:
    p1, p2 = free_port(), free_port()
    sb1 = echo_sandbox(local_modal, app, p1, encrypted_ports=[p1])
    sb2 = echo_sandbox(local_modal, app, p2, encrypted_ports=[p2])
    for sb in (sb1, sb2):
        sb.wait_until_ready(timeout=30)
    assert get(sb1.tunnels()[p1].url, local_modal)["sandbox"] == sb1.object_id
    assert get(sb2.tunnels()[p2].url, local_modal)["sandbox"] == sb2.object_id
    assert sb1.tunnels()[p1].host != sb2.tunnels()[p2].host  # each tunnel its own host
    sb1.terminate()
    sb2.terminate()


NO_NETNS = (
    "this local server cannot isolate sandboxes (it needs root): without network "
    "namespaces two sandboxes cannot both listen on one port"
)


def test_two_sandboxes_serving_the_same_port(local_modal: LocalModal, app: Any) -> None:
    if not sandbox_netns_available(local_modal):
        pytest.skip(reason=NO_NETNS)
    port = 8000
    sbs = [echo_sandbox(local_modal, app, port, encrypted_ports=[port]) for _ in range(2)]
    for sb in sbs:
        sb.wait_until_ready(timeout=30)
    for sb in sbs:
        assert get(sb.tunnels()[port].url, local_modal)["sandbox"] == sb.object_id
        sb.terminate()


def test_tunnels_end_with_the_sandbox(local_modal: LocalModal, app: Any, backend: str) -> None:
    port = free_port()
    sb = echo_sandbox(local_modal, app, port, encrypted_ports=[port])
    sb.wait_until_ready(timeout=30)
    t = sb.tunnels()[port]
    assert get(t.url, local_modal)["sandbox"] == sb.object_id
    sb.terminate()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((t.host, t.port), timeout=5).close()
    again = modal.Sandbox.from_id(sb.object_id, client=local_modal.client)
    assert again.tunnels() == {}


def test_tunnels_close_when_the_server_stops(tmp_path: Any) -> None:
    lm = LocalModal(state_dir=tmp_path / "lm").start()
    try:
        app = modal.App.lookup("stop-app", create_if_missing=True, client=lm.client)
        port = free_port()
        sb = echo_sandbox(lm, app, port, encrypted_ports=[port])
        sb.wait_until_ready(timeout=30)
        t = sb.tunnels()[port]
        assert get(t.url, lm)["sandbox"] == sb.object_id
    finally:
        lm.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((t.host, t.port), timeout=5).close()


def test_connect_token(local_modal: LocalModal, app: Any, backend: str) -> None:
    port = free_port()
    sb = echo_sandbox(local_modal, app, port)
    sb.wait_until_ready(timeout=30)
    creds = sb.create_connect_token(user_metadata={"user_id": "u-42"}, port=port)
    if may_bind_443():
        assert creds.url.startswith("https://127.") and creds.url.count(":") == 1  # port 443
    else:  # a host of its own on a high port, which the URL carries
        proxy_host, _, proxy_port = creds.url.removeprefix("https://").partition(":")
        assert proxy_host.startswith("127.") and int(proxy_port) != 443
    body = get(
        creds.url + "/x?a=1",
        local_modal,
        {"Authorization": f"Bearer {creds.token}", "X-Verified-User-Data": "spoofed"},
    )
    assert body["sandbox"] == sb.object_id and body["path"] == "/x?a=1"
    assert json.loads(body["headers"]["x-verified-user-data"]) == {"user_id": "u-42"}
    assert "authorization" not in body["headers"]  # the token stays with the proxy
    # the token may also come as a query parameter; it is not passed on
    body = get(f"{creds.url}/q?_modal_connect_token={creds.token}&b=2", local_modal)
    assert body["path"] == "/q?b=2"
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        with pytest.raises(urllib.error.HTTPError) as err:
            get(creds.url + "/", local_modal, headers)
        assert err.value.code == 401
    sb.terminate()
    with pytest.raises(urllib.error.HTTPError) as err:
        get(creds.url + "/", local_modal, {"Authorization": f"Bearer {creds.token}"})
    assert err.value.code == 401  # the sandbox's tokens end with it


def test_inbound_cidr_allowlist_is_enforced(local_modal: LocalModal, app: Any) -> None:
    port = free_port()
    sb = echo_sandbox(
        local_modal, app, port, encrypted_ports=[port], inbound_cidr_allowlist=["10.0.0.0/8"]
    )
    sb.wait_until_ready(timeout=30)
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        get(sb.tunnels()[port].url, local_modal)
    creds = sb.create_connect_token(port=port)
    with pytest.raises(urllib.error.HTTPError) as err:
        get(creds.url, local_modal, {"Authorization": f"Bearer {creds.token}"})
    assert err.value.code == 403
    sb.terminate()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encrypted_ports": [8000], "unencrypted_ports": [8000]}, "port 8000 is already listed"),
        ({"encrypted_ports": [70000]}, "encrypted_ports: port 70000 is out of range"),
        ({"inbound_cidr_allowlist": ["10.0.0.0/33"]}, "'10.0.0.0/33' is not a CIDR range"),
    ],
)
def test_bad_tunnel_settings_are_refused_before_start(
    local_modal: LocalModal, app: Any, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(modal.exception.InvalidError, match=message):
        modal.Sandbox.create("sleep", "100", app=app, client=local_modal.client, **kwargs)
    assert local_modal.sandboxes() == []


def test_tcp_probe_delays_wait_until_ready(local_modal: LocalModal, app: Any, backend: str) -> None:
    port = free_port()
    sb = echo_sandbox(local_modal, app, port, delay=1.5)
    sb.wait_until_ready(timeout=30)
    # ready means the port accepts: a connection right now succeeds (inside the
    # sandbox: its loopback is its own, not this machine's)
    code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).close()"
    assert sb.exec("python", "-c", code).wait() == 0
    assert sb.poll() is None
    sb.terminate()


def test_exec_probe(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = modal.Sandbox.create(
        "sh",
        "-c",
        "sleep 1.5; touch ready; sleep 100",
        app=app,
        client=local_modal.client,
        readiness_probe=modal.Probe.with_exec("sh", "-c", "test -f ready", interval_ms=50),
    )
    sb.wait_until_ready(timeout=30)
    check = sb.exec("sh", "-c", "test -f ready && echo present")
    assert check.stdout.read() == "present\n"
    assert check.wait() == 0
    sb.terminate()


def test_wait_until_ready_timeout(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = modal.Sandbox.create(
        "sleep",
        "100",
        app=app,
        client=local_modal.client,
        readiness_probe=modal.Probe.with_exec("false"),
    )
    with pytest.raises(modal.exception.TimeoutError):
        sb.wait_until_ready(timeout=1)
    assert sb.poll() is None  # a probe that never passes does not end the sandbox
    sb.terminate()


def test_wait_until_ready_without_probe(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = modal.Sandbox.create("sleep", "100", app=app, client=local_modal.client)
    with pytest.raises(modal.exception.ConflictError, match="does not have a readiness probe"):
        sb.wait_until_ready(timeout=5)
    sb.terminate()


def test_sandbox_that_exits_before_ready(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = modal.Sandbox.create(
        "sh",
        "-c",
        "sleep 0.5; exit 3",
        app=app,
        client=local_modal.client,
        readiness_probe=modal.Probe.with_tcp(free_port()),
    )
    with pytest.raises(
        modal.exception.ConflictError, match=r"finished \(exit code 3\) before its readiness"
    ):
        sb.wait_until_ready(timeout=30)
    assert sb.wait(raise_on_termination=False) is None and sb.returncode == 3


def test_bad_probe_is_refused_before_start(local_modal: LocalModal, app: Any) -> None:
    probe = modal.Probe.with_tcp(8080)
    object.__setattr__(probe, "tcp_port", 0)  # the client checks too; the server must not trust it
    with pytest.raises(modal.exception.InvalidError, match="readiness_probe: tcp port 0"):
        modal.Sandbox.create(
            "sleep", "100", app=app, client=local_modal.client, readiness_probe=probe
        )
    assert local_modal.sandboxes() == []
