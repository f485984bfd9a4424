"""The Python interpreters of this machine that an image can be built on.

``debian_slim(python_version="3.X")`` needs a CPython 3.X here: per-step
pickles only load in the same minor version, so another version is never
used silently. Looked for in pyenv (``$PYENV_ROOT/versions/*``, by default
``~/.pyenv``), ``/usr/bin``, ``/usr/local/bin`` and ``PATH`` (pyenv shims are
skipped: they are not interpreters).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

_SERIES = re.compile(r"^python(3\.\d+)$")
_PROBE = (
    "import sys, json; print(json.dumps([sys.version.split()[0], sys.base_prefix, "
    "sys.base_exec_prefix, sys.implementation.name]))"
)


@dataclass(frozen=True)
class Interpreter:
    """A base interpreter: its executable, full version and the prefixes it needs."""

    executable: str
    version: str
    prefixes: tuple[str, ...]

    @property
    def series(self) -> str:
        return ".".join(self.version.split(".")[:2])


def _candidates() -> list[str]:
    found: list[str] = []
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    for d in sorted(glob.glob(os.path.join(pyenv, "versions", "*", "bin"))):
        found += sorted(glob.glob(os.path.join(d, "python3.*")))
    for d in ("/usr/local/bin", "/usr/bin"):
        found += sorted(glob.glob(os.path.join(d, "python3.*")))
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and "shims" not in d.split(os.sep):
            found += sorted(glob.glob(os.path.join(d, "python3.*")))
    return [p for p in found if _SERIES.match(os.path.basename(p)) and os.access(p, os.X_OK)]


def _probe(executable: str) -> Interpreter | None:
    try:
        out = subprocess.run(
            [executable, "-I", "-S", "-c", _PROBE], capture_output=True, text=True, timeout=30
        )
        version, prefix, exec_prefix, impl = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if impl != "cpython":
        return None
    prefixes = tuple(dict.fromkeys(os.path.realpath(p) for p in (prefix, exec_prefix)))
    return Interpreter(os.path.realpath(executable), version, prefixes)


@functools.lru_cache(maxsize=1)
def available() -> dict[str, Interpreter]:
    """Series (``3.11``) -> the interpreter used for it (the first found, in the
    order of the module docstring)."""
    out: dict[str, Interpreter] = {}
    seen: set[str] = set()
    for path in _candidates():
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        interp = _probe(real)
        if interp is not None and interp.series not in out:
            out[interp.series] = interp
    return out


def find(series: str) -> Interpreter | None:
    return available().get(series)


def describe_available() -> str:
    versions = sorted(available(), key=lambda s: tuple(int(p) for p in s.split(".")))
    return ", ".join(versions) if versions else "none"


def uv_binary() -> str:
    """The ``uv`` executable: the one the ``uv`` wheel ships, else ``PATH``'s."""
    try:
        import uv

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise RuntimeError(
                "the local image builder needs uv (pip install uv); it was not found"
            ) from None
        return found
