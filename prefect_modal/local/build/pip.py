"""Install lines run as ``uv pip install --python <the image's environment>``.

``uv`` resolves and installs from the registries this machine reaches, with
its shared wheel cache (``UV_CACHE_DIR``, by default ``~/.cache/uv``), so a
package installed once is linked in the next time in milliseconds. pip's
options that mean the same to uv are passed on (pins, ``--index-url``,
``--extra-index-url``, ``--find-links``, ``--no-deps``...); ``--pre`` becomes
``--prerelease allow``; options about pip itself are dropped.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
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
