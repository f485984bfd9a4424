"""The local server's TLS certificate: what encrypted tunnels and connect tokens present.

Modal's client always forms ``https://host:port`` for a tunnel, so an encrypted
port must speak TLS here too, or the URL silently cannot work. There is no
public CA for 127.0.0.1, so each state directory gets one self-signed
certificate (EC P-256, for ``localhost``, ``127.0.0.1`` and ``::1``), written
to ``<state_dir>/tls/cert.pem`` with its key beside it (mode 0600). Trust that
one file to reach a tunnel, e.g. ``requests.get(url, verify=lm.tls_cert)``; it
is reused while it is valid, so a long-lived state directory keeps its trust.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID_DAYS = 825  # the longest validity common TLS clients accept for a server certificate
_RENEW_BEFORE = datetime.timedelta(days=7)
_lock = threading.Lock()


def cert_paths(state_dir: Path) -> tuple[Path, Path]:
    d = state_dir / "tls"
    return d / "cert.pem", d / "key.pem"


def _still_valid(cert_file: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False
    now = datetime.datetime.now(datetime.timezone.utc)
    return cert.not_valid_after_utc - now > _RENEW_BEFORE


def ensure_certificate(state_dir: Path) -> Path:
    """The path of the server's certificate, created (or renewed) if needed."""
    cert_file, key_file = cert_paths(state_dir)
    with _lock:
        if key_file.exists() and _still_valid(cert_file):
            return cert_file
        cert_file.parent.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prefect-modal local server")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
            # self-signed: it is its own trust anchor, as `openssl req -x509` makes them
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp_key = key_file.with_suffix(".tmp")
        fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        os.replace(tmp_key, key_file)
        tmp_cert = cert_file.with_suffix(".tmp")
        tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp_cert, cert_file)
        return cert_file


def server_context(state_dir: Path, *, alpn: list[str]) -> ssl.SSLContext:
    """A TLS server context with the server's certificate, advertising ``alpn``."""
    cert_file = ensure_certificate(state_dir)
    _, key_file = cert_paths(state_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols(alpn)
    return ctx
