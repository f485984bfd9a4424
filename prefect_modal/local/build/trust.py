"""What ``uv`` trusts when image builds download packages: what pip trusts here.

uv verifies HTTPS with its own bundled Mozilla roots unless told otherwise
(https://docs.astral.sh/uv/concepts/authentication/certificates/), while pip
uses the CA bundle it is configured with, else the system's certificate store
as well as its bundled roots (pip >= 24.2, through truststore:
https://pip.pypa.io/en/stable/topics/https-certificates/). So on a machine
whose TLS is intercepted (a company proxy) pip works and a build's uv fails with
``invalid peer certificate: UnknownIssuer``. `uv_trust_env` closes that gap:

1. uv's own setting (``UV_SYSTEM_CERTS``, formerly ``UV_NATIVE_TLS``) wins:
   whoever set it told uv what to trust.
2. pip's CA bundle, as pip finds it (`pip_ca_bundle`), becomes uv's
   ``SSL_CERT_FILE`` (which uv reads "to use custom CA certificates").
3. ``SSL_CERT_FILE`` or ``SSL_CERT_DIR`` already set: uv reads them itself.
4. Otherwise, if this machine has a system store, uv is told to use it.
"""

from __future__ import annotations

import configparser
import functools
import os
import ssl
import subprocess
import sys
from collections.abc import Mapping

from .pythons import uv_binary

#: uv's own switches for the system store (the second is the deprecated name).
UV_SYSTEM_CERTS_VARIABLES = ("UV_SYSTEM_CERTS", "UV_NATIVE_TLS")


def uv_trust_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Variables to add to `environ` (a uv process's environment) so that uv
    trusts what pip would trust on this machine (see the module's docstring)."""
    if any(environ.get(name) for name in UV_SYSTEM_CERTS_VARIABLES):
        return {}
    bundle = pip_ca_bundle(environ)
    if bundle:
        return {"SSL_CERT_FILE": bundle}
    if environ.get("SSL_CERT_FILE") or environ.get("SSL_CERT_DIR"):
        return {}
    if _system_store_exists():
        return {_system_certs_variable(): "1"}
    return {}


def pip_ca_bundle(environ: Mapping[str, str]) -> str | None:
    """The CA bundle pip verifies with, found as pip finds it: ``PIP_CERT``, then
    ``cert`` in pip's configuration files (``[install]`` over ``[global]``), then
    ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` (read by pip's HTTP library)."""
    value = (
        environ.get("PIP_CERT")
        or _pip_config_cert(environ)
        or environ.get("REQUESTS_CA_BUNDLE")
        or environ.get("CURL_CA_BUNDLE")
    )
    return os.path.abspath(value) if value else None


def _pip_config_files(environ: Mapping[str, str]) -> list[str]:
    """pip's configuration files on Linux, the one that wins last (as
    ``pip config list`` reads them; pip/_internal/configuration.py and
    https://pip.pypa.io/en/stable/topics/configuration/): global (``XDG_CONFIG_DIRS``,
    then /etc), user (~/.pip, then ``XDG_CONFIG_HOME``; skipped when
    ``PIP_CONFIG_FILE`` names a file), the environment's (``sys.prefix``), and
    ``PIP_CONFIG_FILE``; ``PIP_CONFIG_FILE=/dev/null`` loads none."""
    named = environ.get("PIP_CONFIG_FILE")
    if named == os.devnull:
        return []
    home = environ.get("HOME") or os.path.expanduser("~")
    xdg_dirs = (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(os.pathsep)
    files = [os.path.join(d, "pip", "pip.conf") for d in xdg_dirs if d]
    files.append("/etc/pip.conf")
    if not (named and os.path.exists(named)):
        xdg_home = environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        files += [os.path.join(home, ".pip", "pip.conf"), os.path.join(xdg_home, "pip", "pip.conf")]
    files.append(os.path.join(sys.prefix, "pip.conf"))
    if named:
        files.append(named)
    return files


def _pip_config_cert(environ: Mapping[str, str]) -> str | None:
    """``cert`` from pip's configuration files: a later file over an earlier one,
    then the ``install`` section over ``global`` (pip's own order)."""
    found: dict[str, str] = {}
    for path in _pip_config_files(environ):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue  # pip refuses such a file; a build should not fail on it
        for section in ("global", "install"):
            if parser.has_option(section, "cert"):
                found[section] = parser.get(section, "cert").strip()
    return found.get("install") or found.get("global") or None


def _system_store_exists() -> bool:
    """Whether OpenSSL's default CA file or directory is here (Debian's ca-certificates):
    told to use a system store that is missing, uv would trust nothing."""
    paths = ssl.get_default_verify_paths()
    if os.path.isfile(paths.openssl_cafile):
        return True
    try:
        return any(os.scandir(paths.openssl_capath))
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def _system_certs_variable() -> str:
    """``UV_SYSTEM_CERTS`` if this uv knows it (``--system-certs``), else the older
    ``UV_NATIVE_TLS`` (which newer uv still reads, with a deprecation warning)."""
    try:
        out = subprocess.run(
            [uv_binary(), "--help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return "UV_NATIVE_TLS"
    return "UV_SYSTEM_CERTS" if "--system-certs" in out else "UV_NATIVE_TLS"
