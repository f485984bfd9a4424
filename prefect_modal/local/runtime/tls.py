"""The local server's certificate authority, and what tunnels and connect tokens present.

On Modal a tunnel is ``https://<host>`` on port 443 with a certificate every
client trusts (``tunnel.tls_socket`` is ``('wtqcahqwhd4tu0.r5.modal.host', 443)``,
https://modal.com/docs/guide/tunnels). No public CA signs for a loopback
address, so the next best thing is a CA of the server's own that clients are
told to trust once:

* each state directory gets a CA (EC P-256, ``<state_dir>/tls/ca.pem``, its key
  beside it, mode 0600), kept while it is valid so a long-lived state
  directory (``local serve``'s) keeps its trust across restarts;
* each tunnel host gets a certificate signed by it, for exactly that address
  (``tls/hosts/<host>.pem``), reused while the CA that signed it is the current one;
* `write_trust_bundle` writes what clients should trust: this machine's CAs
  (and any bundle the process was already told to use) plus ours, so that
  pointing ``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE`` at it keeps every other
  HTTPS site working;
* `ProcessTrust` sets those two variables in this process while an embedded
  server runs (`LocalModal`), and restores them when the last one stops.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import logging
import os
import re
import shutil
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("prefect_modal.local")

_CA_VALID_DAYS = 3650
_LEAF_VALID_DAYS = 825  # the longest validity common TLS clients accept for a server certificate
_RENEW_BEFORE = datetime.timedelta(days=7)
_lock = threading.RLock()
#: the variables that make Python's HTTPS clients trust a bundle: OpenSSL's (ssl,
#: urllib, httpx, aiohttp, websockets) and requests' own (it otherwise uses certifi)
TRUST_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.S)


def _tls_dir(state_dir: Path) -> Path:
    return state_dir / "tls"


def ca_paths(state_dir: Path) -> tuple[Path, Path]:
    d = _tls_dir(state_dir)
    return d / "ca.pem", d / "ca-key.pem"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_valid(cert_file: Path) -> x509.Certificate | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return None
    return cert if cert.not_valid_after_utc - _now() > _RENEW_BEFORE else None


def ensure_ca(state_dir: Path) -> Path:
    """The path of the state directory's CA certificate, created (or renewed) if needed."""
    cert_file, key_file = ca_paths(state_dir)
    with _lock:
        if key_file.exists() and _load_valid(cert_file) is not None:
            return cert_file
        cert_file.parent.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "prefect-modal"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"prefect-modal local server CA {os.urandom(4).hex()}"
                ),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=_CA_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write_private(key_file, _key_pem(key))
        _write_public(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        # host certificates of a replaced CA are worthless: drop them
        hosts = _tls_dir(state_dir) / "hosts"
        if hosts.is_dir():
            for f in hosts.iterdir():
                f.unlink(missing_ok=True)
        return cert_file


def _san_for(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def host_certificate(state_dir: Path, host: str) -> tuple[Path, Path]:
    """A certificate (and key) for ``host``, signed by the state directory's CA."""
    ca_file, ca_key_file = ca_paths(state_dir)
    with _lock:
        ensure_ca(state_dir)
        ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
        d = _tls_dir(state_dir) / "hosts"
        safe = host.strip("[]").replace(":", "_")
        cert_file, key_file = d / f"{safe}.pem", d / f"{safe}-key.pem"
        cert = _load_valid(cert_file) if key_file.exists() else None
        if cert is not None:
            try:
                cert.verify_directly_issued_by(ca_cert)
                return cert_file, key_file
            except (ValueError, TypeError, InvalidSignature):
                pass  # signed by an earlier CA: make a new one
        d.mkdir(parents=True, exist_ok=True)
        loaded = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host.strip("[]"))]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=_LEAF_VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([_san_for(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(loaded.public_key()),
                critical=False,
            )
            .sign(loaded, hashes.SHA256())
        )
        _write_private(key_file, _key_pem(key))
        _write_public(cert_file, leaf.public_bytes(serialization.Encoding.PEM))
        return cert_file, key_file


def server_context(state_dir: Path, host: str, *, alpn: list[str]) -> ssl.SSLContext:
    """A TLS server context presenting ``host``'s certificate, advertising ``alpn``."""
    cert_file, key_file = host_certificate(state_dir, host)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols(alpn)
    return ctx


# ----- what clients trust -------------------------------------------------------------


def _system_bundles(environ: dict[str, str] | os._Environ[str]) -> list[Path]:
    """The CA bundles this process trusts without us: those it was pointed at, else the
    system's (OpenSSL's default file, Debian's and Red Hat's), else certifi's."""
    named = [environ.get(v) for v in TRUST_VARIABLES]
    found = [Path(p) for p in named if p and Path(p).is_file()]
    if found:
        return found
    # OpenSSL's compiled-in default, not ``cafile`` (which reads SSL_CERT_FILE, maybe ours)
    for candidate in (
        ssl.get_default_verify_paths().openssl_cafile,
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ):
        if candidate and Path(candidate).is_file():
            return [Path(candidate)]
    try:
        import certifi

        return [Path(certifi.where())]
    except ImportError:
        return []


def _certificates(path: Path) -> list[bytes]:
    try:
        return _PEM_RE.findall(path.read_bytes())
    except OSError:
        return []


def bundle_bytes(ca_files: list[Path], environ: dict[str, str] | os._Environ[str]) -> bytes:
    """This machine's CAs plus ``ca_files``, each certificate once."""
    seen: set[bytes] = set()
    out: list[bytes] = []
    for path in [*_system_bundles(environ), *ca_files]:
        for pem in _certificates(path):
            key = pem.replace(b"\r\n", b"\n")
            if key not in seen:
                seen.add(key)
                out.append(key)
    if not out:
        log.warning("local Modal server: found no CA certificates of this machine to trust")
    return b"\n".join(out) + b"\n"


def write_trust_bundle(state_dir: Path, environ: dict[str, str] | None = None) -> Path:
    """``<state_dir>/tls/trust-bundle.pem``: what ``SSL_CERT_FILE`` and
    ``REQUESTS_CA_BUNDLE`` should name for a client to reach the server's tunnels
    and every other HTTPS site."""
    ca = ensure_ca(state_dir)
    path = _tls_dir(state_dir) / "trust-bundle.pem"
    with _lock:
        _write_public(path, bundle_bytes([ca], os.environ if environ is None else environ))
    return path


class ProcessTrust:
    """Makes this process's HTTPS clients trust the CAs of its running embedded servers.

    Sets `TRUST_VARIABLES` to one bundle (the variables' earlier values' CAs, or
    this machine's, plus each running server's CA) in a private temporary
    directory; the last server to stop puts the earlier values back, unless
    someone else changed them meanwhile. The bundle file lives as long as the
    process: with no server running it holds just the earlier CAs, so a value
    copied while a server ran (a test's ``monkeypatch`` undoing, a child's
    environment) still names a file that verifies every other site.
    """

    _lock = threading.Lock()
    _active: dict[int, Path] = {}
    _saved: dict[str, str | None] | None = None
    _dir: Path | None = None

    @classmethod
    def add(cls, key: int, ca_file: Path) -> None:
        with cls._lock:
            if cls._dir is None:
                cls._dir = Path(tempfile.mkdtemp(prefix="prefect-modal-trust-"))
                atexit.register(shutil.rmtree, cls._dir, True)
            if cls._saved is None:
                ours = str(cls._bundle())
                cls._saved = {
                    v: (None if os.environ.get(v) == ours else os.environ.get(v))
                    for v in TRUST_VARIABLES
                }
            cls._active[key] = ca_file
            cls._write(set_env=True)

    @classmethod
    def remove(cls, key: int) -> None:
        with cls._lock:
            if cls._active.pop(key, None) is None:
                return
            if cls._active:
                cls._write(set_env=True)
                return
            cls._write(set_env=False)  # the earlier CAs only, for stale references
            bundle = str(cls._bundle())
            saved, cls._saved = cls._saved or {}, None
            for var in TRUST_VARIABLES:
                if os.environ.get(var) != bundle:
                    continue  # changed by someone else since: theirs stays
                old = saved.get(var)
                if old is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = old

    @classmethod
    def _bundle(cls) -> Path:
        assert cls._dir is not None
        return cls._dir / "trust-bundle.pem"

    @classmethod
    def _write(cls, *, set_env: bool) -> None:
        saved = {k: v for k, v in (cls._saved or {}).items() if v is not None}
        bundle = cls._bundle()
        _write_public(bundle, bundle_bytes(list(cls._active.values()), saved))
        if set_env:
            for var in TRUST_VARIABLES:
                os.environ[var] = str(bundle)
