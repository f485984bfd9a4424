"""A package index over HTTPS on 127.0.0.1, signed by a CA made for one test.

As a machine whose TLS is intercepted sees PyPI: a certificate chain that only
a CA named in the machine's configuration (``SSL_CERT_FILE``, pip's ``cert``)
vouches for, and that no bundled root store knows.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import ssl
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect_modal.local.runtime import tls


@dataclass(frozen=True)
class HttpsIndex:
    """A running index: its simple API's URL and the CA bundle that trusts it."""

    url: str
    ca_file: Path


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 it signed (what a
    TLS-intercepting proxy presents), made as the local server makes its tunnels'
    (`tls.ensure_ca`, `tls.host_certificate`): (CA file, certificate, key)."""
    cert_file, key_file = tls.host_certificate(directory, "127.0.0.1")
    return tls.ensure_ca(directory), cert_file, key_file


def build_wheel(directory: Path, name: str, version: str, source: str) -> Path:
    """A pure-Python wheel of one module, ``name/__init__.py`` holding `source`."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": source.encode(),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
        ),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: prefect-modal-tests\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def _write_simple_index(root: Path, project: str, wheel: Path) -> None:
    """PEP 503: ``/simple/<project>/`` links to the wheel, with its sha256."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    (files / wheel.name).write_bytes(wheel.read_bytes())
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    page = root / "simple" / project
    page.mkdir(parents=True, exist_ok=True)
    (page / "index.html").write_text(
        "<!DOCTYPE html><html><body>"
        f'<a href="../../files/{wheel.name}#sha256={digest}">{wheel.name}</a>'
        "</body></html>\n"
    )
    (root / "simple" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{project}/">{project}</a></body></html>\n'
    )


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def https_index(directory: Path, project: str, wheel: Path) -> Iterator[HttpsIndex]:
    """Serve `wheel` as `project` from ``https://127.0.0.1:<free port>/simple/`` until
    the block ends (then the server is shut down and its socket closed)."""
    root = directory / "index"
    _write_simple_index(root, project, wheel)
    ca_file, cert_file, key_file = make_ca_and_server_cert(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)

    def handler(*args: object) -> _Quiet:
        return _Quiet(*args, directory=str(root))  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="https-index", daemon=True)
    thread.start()
    try:
        yield HttpsIndex(f"https://127.0.0.1:{server.server_address[1]}/simple/", ca_file)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
