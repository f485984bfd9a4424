"""Install lines run as ``uv pip install --python <the image's environment>``.

``uv`` resolves and installs from the registries this machine reaches. pip's
options that mean the same to uv are passed on (pins, ``--index-url``,
``--extra-index-url``, ``--find-links``, ``--no-deps``...); ``--pre`` becomes
``--prerelease allow``; options about pip itself are dropped.

Where the server has a build sandbox (isolated), the install runs *in* it
(`sandboxed_install`): an sdist's build backend is a package's own code, and
on Modal it runs in the image build's container, never on a machine that
matters. This machine's ``uv`` binary is bound read-only into the sandbox, the
new environment read-write at its own path, and uv's cache is one of the
build sandboxes' own (`BUILD_UV_CACHE`, beside the layer cache), shared
read-write with build sandboxes only: never the user's ``~/.cache/uv``, which
uv on this machine trusts. Without a build sandbox, uv runs on this machine
(`install`), with its shared wheel cache (``UV_CACHE_DIR``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.processes import with_pdeathsig
from .pythons import uv_binary
from .trust import uv_trust_env

#: pip options without a meaning here (flags, no value)
_DROPPED_FLAGS = {
    "--system",
    "--no-cache",
    "--no-cache-dir",
    "--disable-pip-version-check",
    "--break-system-packages",
    "--user",
    "--no-warn-script-location",
}
_DROPPED_WITH_VALUE = {"--root-user-action", "--progress-bar"}
_FILE_OPTIONS = {"-r", "--requirement", "--requirements", "-c", "--constraint", "--constraints"}


#: Where a build sandbox sees what it needs of the server's for an install.
BUILD_DIR_AT = "/run/prefect-modal-build"
#: this machine's uv binary (read-only)
UV_AT = f"{BUILD_DIR_AT}/uv"
#: the build sandboxes' uv cache (read-write)
UV_CACHE_AT = f"{BUILD_DIR_AT}/uv-cache"
#: the CA bundle / directory uv is told to trust (`trust.uv_trust_env`), read-only
CERT_FILE_AT = f"{BUILD_DIR_AT}/ca-bundle.pem"
CERT_DIR_AT = f"{BUILD_DIR_AT}/ca-certs"
#: where a build sandbox's uv finds its user-level configuration (HOME is /root there)
UV_USER_CONFIG_AT = "/root/.config/uv/uv.toml"
#: The directory (beside the layer cache) of the build sandboxes' uv cache.
BUILD_UV_CACHE = "uv"
#: The server's variables a build sandbox's uv gets: uv's own settings (its
#: index URLs, resolution options), the proxies it must go through. Nothing
#: else of the server's environment (tokens, credentials) enters a build.
_PASSED_PREFIXES = ("UV_",)
_PASSED = {
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
}
#: uv settings that name paths of this machine or that the build sets itself.
_NOT_PASSED = {
    "UV_CACHE_DIR",
    "UV_PYTHON_INSTALL_DIR",
    "UV_TOOL_DIR",
    "UV_TOOL_BIN_DIR",
    "UV_CONFIG_FILE",
    "UV_PYTHON",
    "UV_PROJECT_ENVIRONMENT",
}


class BuildStepError(Exception):
    """A build step failed; the message is what the client shows."""


def uv_args(args: list[str], files: dict[str, str], scratch: Path) -> list[str]:
    """pip's arguments as uv's; context files (requirements) written under ``scratch``."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in _DROPPED_FLAGS:
            i += 1
            continue
        if a in _DROPPED_WITH_VALUE:
            i += 2
            continue
        if any(a.startswith(f"{o}=") for o in _DROPPED_WITH_VALUE):
            i += 1
            continue
        if a == "--pre":
            out += ["--prerelease", "allow"]
        elif a in _FILE_OPTIONS and i + 1 < len(args):
            out += [a, _local(args[i + 1], files, scratch)]
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def _local(path: str, files: dict[str, str], scratch: Path) -> str:
    if path not in files:
        return path
    target = scratch / path.strip("/").replace("/", "_")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(files[path], encoding="utf-8")
    return str(target)


def uv_env() -> dict[str, str]:
    """The environment uv runs in: this server's (proxies, certificates, uv's own
    settings such as ``UV_CACHE_DIR`` and ``UV_INDEX_URL``), nothing of a venv's;
    and the certificates pip would trust here (`uv_trust_env`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(uv_trust_env(env))
    env.setdefault("UV_NO_PROGRESS", "1")
    env["UV_PYTHON_DOWNLOADS"] = "never"  # an image's Python is this machine's, never fetched
    return env


async def run_logged(argv: list[str], log: Callable[[str], None], cwd: Path) -> int:
    """Run ``argv`` with stdout and stderr, line by line, to ``log``; its exit code.

    It dies with the server, as sandboxes do (`with_pdeathsig`): a build can
    outlast a server that is killed, and nothing would wait for it."""
    env = uv_env()
    argv, preexec = with_pdeathsig(argv, env)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        env=env,
        cwd=str(cwd),
        preexec_fn=preexec,
    )
    assert proc.stdout is not None
    async for raw in proc.stdout:
        log(raw.decode(errors="replace"))
    return await proc.wait()


async def make_venv(interpreter: str, dest: Path, log: Callable[[str], None]) -> None:
    """A relocatable virtual environment with pip (``--seed``), as an image's Python has."""
    argv = [uv_binary(), "venv", "--seed", "--relocatable", "--python", interpreter, str(dest)]
    code = await run_logged(argv, log, dest.parent)
    if code != 0:
        raise BuildStepError(f"creating the image's Python environment failed (uv exit {code})")


async def install(
    venv: Path, args: list[str], files: dict[str, str], log: Callable[[str], None], scratch: Path
) -> None:
    argv = [uv_binary(), "pip", "install", "--python", str(venv / "bin" / "python")]
    argv += uv_args(args, files, scratch)
    log(f"$ uv pip install {' '.join(argv[5:])}\n")
    code = await run_logged(argv, log, scratch)
    if code != 0:
        raise BuildStepError(f"pip install failed (uv exit code {code}); see the build log above")


@dataclass
class SandboxedInstall:
    """A ``uv pip install`` for a build sandbox: its argv and environment there,
    what is bound read-only (container path -> host file or directory) and
    read-write (the new environment and the build uv cache)."""

    argv: list[str]
    env: dict[str, str]
    ro: dict[str, Path] = field(default_factory=dict)
    rw: dict[str, Path] = field(default_factory=dict)


def sandboxed_install(
    venv: Path,
    args: list[str],
    files: dict[str, str],
    scratch: Path,
    cache_dir: Path,
    environ: Mapping[str, str] | None = None,
) -> SandboxedInstall:
    """The install of ``args`` into ``venv`` (seen at its own path) as a build sandbox
    runs it. ``scratch`` holds the context files (requirements; bound read-only at
    its own path); ``cache_dir`` is the build sandboxes' uv cache on this machine."""
    environ = os.environ if environ is None else environ
    cache_dir.mkdir(parents=True, exist_ok=True)
    env = {
        k: v
        for k, v in environ.items()
        if (k.startswith(_PASSED_PREFIXES) or k in _PASSED) and k not in _NOT_PASSED
    }
    ro: dict[str, Path] = {UV_AT: Path(uv_binary()), str(scratch): scratch}
    config = uv_config_file(environ)
    if config is not None:  # what uv here reads: its indexes, its resolution settings
        ro[UV_USER_CONFIG_AT] = config
        if environ.get("UV_CONFIG_FILE"):  # it replaces the other files, as it does here
            env["UV_CONFIG_FILE"] = UV_USER_CONFIG_AT
    trust = {**{k: environ[k] for k in ("SSL_CERT_FILE", "SSL_CERT_DIR") if environ.get(k)}}
    trust.update(uv_trust_env(environ))
    for name, value in trust.items():
        if name == "SSL_CERT_FILE" and os.path.isfile(value):
            ro[CERT_FILE_AT] = Path(value)
            env[name] = CERT_FILE_AT
        elif name == "SSL_CERT_DIR" and os.path.isdir(value):
            ro[CERT_DIR_AT] = Path(value)
            env[name] = CERT_DIR_AT
        elif name not in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            env[name] = value  # UV_SYSTEM_CERTS: the view's /etc/ssl/certs
    env.update(
        UV_CACHE_DIR=UV_CACHE_AT,
        UV_NO_PROGRESS="1",
        UV_PYTHON_DOWNLOADS="never",  # an image's Python is this machine's, never fetched
        # copies, never hard links into the cache: a later build must not be able to
        # change this layer's files through the cache, nor this build the cache's
        UV_LINK_MODE="copy",
    )
    argv = [UV_AT, "pip", "install", "--python", str(venv / "bin" / "python")]
    argv += uv_args(args, files, scratch)
    return SandboxedInstall(argv, env, ro, {str(venv): venv, UV_CACHE_AT: cache_dir})


def uv_config_file(environ: Mapping[str, str]) -> Path | None:
    """The uv configuration file of this server's user, as uv finds it
    (https://docs.astral.sh/uv/concepts/configuration-files/): ``UV_CONFIG_FILE``,
    else ``$XDG_CONFIG_HOME/uv/uv.toml`` (``~/.config/uv/uv.toml``); None without
    one or with ``UV_NO_CONFIG``. The system's (``/etc/uv/uv.toml``) is in the
    sandbox's /etc view."""
    if environ.get("UV_NO_CONFIG"):
        return None
    named = environ.get("UV_CONFIG_FILE")
    if named:
        return Path(named) if os.path.isfile(named) else None
    home = environ.get("HOME") or os.path.expanduser("~")
    xdg = environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    user = Path(xdg) / "uv" / "uv.toml"
    return user if user.is_file() else None
