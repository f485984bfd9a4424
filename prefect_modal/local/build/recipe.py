"""What the modal client's Dockerfile commands ask for, as build steps.

The client sends each image as ``FROM`` + commands (see ``modal/_image.py``).
`debian_slim` is recognised by its ``FROM python:X.Y.Z-slim-<codename>`` and
its own set-up lines (apt-get of compilers, pip upgrades, debconf) are left
to this machine's userland; the modal client's requirements it installs are
installed. Install lines of `pip_install`, `uv_pip_install`,
`pip_install_from_requirements` and `pip_install_from_pyproject` become
``pip`` steps, ``apt-get install -y`` an ``apt`` step, other ``RUN`` lines
``run`` steps, and ``ENV`` / ``WORKDIR`` / ``ENTRYPOINT`` / ``CMD`` set the
image's metadata.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

_DEBIAN_SLIM = re.compile(r"^python:(\d+\.\d+)(?:\.\d+)?-slim-[a-z]+$")
#: debian_slim's own set-up, which this machine's userland stands in for
_BASE_SETUP = (
    re.compile(r"^RUN apt-get install -y gcc gfortran build-essential$"),
    re.compile(r"^RUN pip install --upgrade [a-z ]+$"),
    re.compile(r"^RUN echo 'debconf debconf/frontend select Noninteractive' \| debconf-set"),
    re.compile(r"^RUN rm /modal_requirements\.txt$"),
    re.compile(r"^COPY /modal_requirements\.txt /modal_requirements\.txt$"),
)
_NOOP = (
    re.compile(r"^RUN apt-get update$"),
    re.compile(r"^COPY --from=ghcr\.io/astral-sh/uv:\S+ /uv \S+$"),  # uv is ours
)
_OPERATOR = set(";&|<>()")
_PIP_PREFIXES = (
    ("python", "-m", "pip", "install"),
    ("python3", "-m", "pip", "install"),
    ("pip", "install"),
    ("pip3", "install"),
    ("uv", "pip", "install"),
    ("/.uv/uv", "pip", "install"),
)
_APT = re.compile(r"^apt-get install -y (.+)$")


@dataclass
class Step:
    """One build step: ``kind`` and what it needs (JSON-able: it is hashed)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    def definition(self) -> Any:
        return [self.kind, self.data]


@dataclass
class Recipe:
    """``base``: None (built on the parent image), ``python:3.X`` (debian_slim)
    or ``registry:<FROM>`` (an image this machine cannot pull)."""

    base: str | None
    steps: list[Step]


def parse(commands: list[str], context_files: dict[str, str]) -> Recipe:
    """``context_files``: path in the build context -> its text (requirements files)."""
    base: str | None = None
    steps: list[Step] = []
    cmds = [c.strip() for c in commands if c.strip()]
    slim = False
    for c in cmds:
        word, _, rest = c.partition(" ")
        word = word.upper()
        if word == "FROM":
            ref = rest.strip()
            if ref == "base":
                continue
            m = _DEBIAN_SLIM.match(ref)
            slim = m is not None
            base = f"python:{m.group(1)}" if m else f"registry:{ref}"
            continue
        if slim and any(p.match(c) for p in _BASE_SETUP):
            continue
        if any(p.match(c) for p in _NOOP):
            continue
        if word == "ENV":
            steps.append(Step("env", {"vars": _env_vars(rest)}))
        elif word == "WORKDIR":
            steps.append(Step("workdir", {"path": rest.strip()}))
        elif word in ("ENTRYPOINT", "CMD"):
            steps.append(Step(word.lower(), {"argv": _exec_form(rest)}))
        elif word == "COPY":
            parts = shlex.split(rest)
            if parts and parts[0] in context_files:
                continue  # a context file (requirements): read where it is used
            steps.append(Step("copy", {"args": parts}))
        elif word == "RUN":
            steps.append(_run_step(rest.strip(), context_files))
        else:
            steps.append(Step("ignored", {"line": c}))
    return Recipe(base, steps)


def _env_vars(body: str) -> dict[str, str]:
    try:
        parts = shlex.split(body)
    except ValueError:
        return {}
    if parts and "=" not in parts[0]:
        return {parts[0]: " ".join(parts[1:])}
    out: dict[str, str] = {}
    for p in parts:
        k, _, v = p.partition("=")
        out[k] = v
    return out


def _exec_form(body: str) -> list[str]:
    body = body.strip()
    if body.startswith("["):
        try:
            value = json.loads(body)
            if isinstance(value, list):
                return [str(v) for v in value]
        except ValueError:
            pass
    return ["/bin/sh", "-c", body]


def _plain_argv(line: str) -> list[str] | None:
    """The words of ``line`` if it is one plain command (no shell operator, pipe,
    redirection or substitution outside quotes), else None."""
    body = line.replace("--python $(command -v python)", "")
    lexer = shlex.shlex(body, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:
        return None
    if any(w and set(w) <= _OPERATOR for w in words) or "`" in body or "$(" in body:
        return None
    return shlex.split(body)


def _run_step(line: str, context_files: dict[str, str]) -> Step:
    argv = _plain_argv(line)
    apt = _APT.match(line)
    if apt and argv is not None:
        return Step("apt", {"packages": argv[3:], "line": line})
    if argv is not None:
        for prefix in _PIP_PREFIXES:
            if tuple(argv[: len(prefix)]) == prefix:
                args = argv[len(prefix) :]
                files = {
                    a: context_files[a] for a in args if a in context_files
                }  # hashed with the step: a changed requirements file is a new layer
                return Step("pip", {"args": args, "files": files, "line": line})
    return Step("run", {"command": line})
