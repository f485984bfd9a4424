"""Build an image's layers from its recipe, each one cached (`cache`), with build logs.

An image built here (`ImageState`) is: this machine's Debian userland
read-only (as every sandbox has it), a base Python of the version asked for
(its prefix read-only at its own path), the image's own virtual environment
(made with ``uv``, read-only at the same absolute path as on this machine:
nothing of the server's environment), file layers copied into each new
sandbox root (``apt_install``, ``run_commands``, ``workdir``), and its
``ENV`` / ``WORKDIR`` / ``ENTRYPOINT`` / ``CMD``.

``run_commands`` run in a build sandbox (the runtime's container, over the
layers so far, the environment writable, ``/usr`` and ``/etc`` writable
overlays); the root they leave is the next layer. ``pip_install`` /
``uv_pip_install`` run uv in a build sandbox too (`Builder._pip`), so a
package's build backend never runs on this machine. ``apt_install`` packages
are fetched by apt-get and installed by dpkg in a build sandbox whose ``/usr``
and ``/etc`` are writable overlays, so their maintainer scripts run there
(`apt`). Registry images cannot be pulled here:
they keep the server's view (this machine's userland and the server's Python)
and their steps are not run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import pip, pythons, run_layers
from .cache import LayerCache, layer_key
from .pip import BuildStepError
from .recipe import Recipe, Step

Log = Callable[[str], None]


class RunInSandbox(Protocol):
    """Runs a build command in a container: (argv, env, workdir, root dir, layers,
    read-only dirs, writable binds, log, writable overlays' upper dirs, read-only
    binds) -> exit code."""

    def __call__(
        self,
        argv: list[str],
        env: dict[str, str],
        workdir: str,
        root: Path,
        image_layers: list[Path],
        ro_dirs: list[str],
        rw: dict[str, Path],
        log: Log,
        uppers: dict[str, Path] | None = None,
        ro: dict[str, Path] | None = None,
    ) -> Awaitable[int]: ...


#: The build log's line when uv must run on this machine (no build sandbox).
NO_BUILD_SANDBOX_PIP = (
    "[prefect-modal local] this local server has no build sandbox (it cannot isolate "
    "sandboxes), so uv runs on this machine as {user}: a package built from source (an sdist) "
    "runs its build code here, with your rights. On Modal it runs in the image's container\n"
)


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


#: PATH in an image with a Python environment: its bin first, as Modal's images
#: have /usr/local/bin/python first.
STANDARD_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]


class ImageBuildError(Exception):
    """The build failed; the message is what the client shows (`GenericResult.exception`)."""


@dataclass
class ImageState:
    """What sandboxes of a built image get (JSON-able: kept in each layer's meta.json)."""

    key: str = ""
    kind: str = "host"  # "python" (built here) or "host" (a registry image: the server's view)
    registry: str = ""  # the FROM of a registry image
    python: str = ""  # base interpreter
    version: str = ""
    prefixes: list[str] = field(default_factory=list)
    venv: str = ""
    layers: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageState:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def copy(self) -> ImageState:
        return ImageState.from_json(asdict(self))

    @property
    def ro_dirs(self) -> list[str]:
        """Host directories a sandbox sees read-only at their paths (beyond the userland)."""
        return [*self.prefixes, *([self.venv] if self.venv else [])]

    @property
    def path(self) -> list[str]:
        return [f"{self.venv}/bin", *STANDARD_PATH] if self.venv else []


def _copy_tree(src: Path, dst: Path) -> None:
    """A copy of ``src`` of its own (no file shared with it: a build sandbox writes
    in it), by coreutils' ``cp -a`` (twice as fast as shutil here; a clone where the
    file system can, btrfs or XFS), else shutil."""
    cp = shutil.which("cp")
    if cp is not None:
        done = subprocess.run(
            [cp, "-a", "--reflink=auto", "--", str(src), str(dst)],
            capture_output=True,
            text=True,
            errors="replace",
        )
        if done.returncode == 0:
            return
        shutil.rmtree(dst, ignore_errors=True)  # not GNU cp? shutil, from the start
    shutil.copytree(src, dst, symlinks=True)


class Builder:
    """Builds recipes into `ImageState`s with the layer cache; counts on `cache`."""

    def __init__(self, cache: LayerCache, run_in_sandbox: RunInSandbox | None) -> None:
        self.cache = cache
        self.run_in_sandbox = run_in_sandbox

    # ----- planning -----------------------------------------------------------------

    def base_state(self, recipe: Recipe, parent: ImageState | None) -> ImageState:
        """The state the steps start from; raises `ImageBuildError` for a Python
        version this machine does not have."""
        if recipe.base is None:
            if parent is None:
                raise ImageBuildError("the image has no FROM and no base image")
            return parent.copy()
        if recipe.base.startswith("registry:"):
            ref = recipe.base.removeprefix("registry:")
            return ImageState(key=layer_key("", ["registry", ref]), kind="host", registry=ref)
        series = recipe.base.removeprefix("python:")
        interp = pythons.find(series)
        if interp is None:
            raise ImageBuildError(
                f"Image.debian_slim(python_version={series!r}): this machine has no Python "
                f"{series}, so the local Modal server cannot build this image (it never "
                f"substitutes another version). Versions it can build: "
                f"{pythons.describe_available()}. Install Python {series} (e.g. "
                f"`pyenv install {series}`), or use one of those."
            )
        return ImageState(
            key="",  # set by the base layer
            kind="python",
            python=interp.executable,
            version=interp.version,
            prefixes=list(interp.prefixes),
        )

    def planned_key(self, recipe: Recipe, parent: ImageState | None) -> str:
        """The key of the image's last layer, without building anything."""
        state = self.base_state(recipe, parent)
        key = state.key or self._base_key(state)
        for step in recipe.steps:
            key = layer_key(key, self._definition(step))
        return key

    def _definition(self, step: Step) -> Any:
        """What a step's layer is keyed by: its definition, and for ``apt`` how its
        packages are put in (installed with their maintainer scripts in a build
        sandbox, or only unpacked), so layers of the two ways never stand in for
        each other in a shared cache; likewise ``pip`` run by uv in a build sandbox,
        and ``run`` layers that keep their ``/usr`` and ``/etc`` changes."""
        if step.kind == "apt":
            how = "unpacked" if self.run_in_sandbox is None else "dpkg-in-build-sandbox"
            return [*step.definition(), how]
        if step.kind == "pip" and self.run_in_sandbox is not None:
            return [*step.definition(), "uv-in-build-sandbox"]
        if step.kind == "run":
            return [*step.definition(), "root-with-usr-etc-overlays"]
        return step.definition()

    @staticmethod
    def _base_key(state: ImageState) -> str:
        return layer_key("", ["python", state.python, state.version])

    def lookup(self, key: str) -> ImageState | None:
        meta = self.cache.meta(key)
        return ImageState.from_json(meta["state"]) if meta else None

    # ----- building -----------------------------------------------------------------

    async def build(self, recipe: Recipe, parent: ImageState | None, log: Log) -> ImageState:
        state = self.base_state(recipe, parent)
        if state.kind == "python" and not state.key:
            key = self._base_key(state)

            async def base(here: Path) -> dict[str, Any]:
                log(f"Building the Python {state.version} environment ({state.python})\n")
                await pip.make_venv(state.python, here / "venv", log)
                done = state.copy()
                done.key, done.venv = key, str(here / "venv")
                return {"state": asdict(done)}

            state = await self._layer(key, base, log)
        for step in recipe.steps:
            state = await self._step(state, step, log)
        return state

    async def _layer(
        self, key: str, build: Callable[[Path], Awaitable[dict[str, Any]]], log: Log
    ) -> ImageState:
        try:
            meta, built = await self.cache.get_or_build(key, build)
        except BuildStepError as exc:
            raise ImageBuildError(str(exc)) from None
        if not built:
            log(f"Layer {key[:12]}: cached\n")
        return ImageState.from_json(meta["state"])

    async def _step(self, state: ImageState, step: Step, log: Log) -> ImageState:
        key = layer_key(state.key, self._definition(step))
        kind, data = step.kind, step.data
        if kind in ("env", "entrypoint", "cmd", "ignored", "copy"):
            new = state.copy()
            new.key = key
            if kind == "env":
                new.env.update(data["vars"])
            elif kind == "entrypoint":
                new.entrypoint = list(data["argv"])
            elif kind == "cmd":
                new.cmd = list(data["argv"])
            elif kind == "copy" and data.get("layer"):
                new.layers.append(str(data["layer"]))
            elif kind == "ignored":
                log(f"[prefect-modal local] not applied here: {data['line']}\n")
            return new
        if state.kind != "python":
            new = state.copy()
            new.key = key
            log(
                f"[prefect-modal local] not built: {kind} step on registry image "
                f"{state.registry!r}, which this machine cannot pull\n"
            )
            return new

        async def build(here: Path) -> dict[str, Any]:
            new = state.copy()
            new.key = key
            if kind == "pip":
                new.venv = str(await self._pip(state, data, here, log))
            elif kind == "workdir":
                path = _absolute(data["path"], state.workdir)
                (here / "fs" / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
                new.layers.append(str(here / "fs"))
                new.workdir = path
            elif kind == "apt":
                new.layers = await self._apt(state, list(data["packages"]), here, log)
            elif kind == "run":
                new.layers = await self._run(state, data["command"], here, log)
                new.venv = str(here / "venv")
            else:
                raise ImageBuildError(f"unknown build step {kind!r}")
            return {"state": asdict(new)}

        return await self._layer(key, build, log)

    async def _pip(self, state: ImageState, data: dict[str, Any], here: Path, log: Log) -> Path:
        """A ``pip_install`` / ``uv_pip_install`` layer: the image's environment with
        the packages (``here/venv``); returns it.

        With a build sandbox (an isolated server) uv runs in it, as Modal's build
        runs pip in the image's container: an sdist's build backend (a package's
        own ``setup.py``) runs there, never on this machine (`pip.sandboxed_install`).
        The environment is a copy of the last one (not hard links: the build
        sandbox could write through a link into that layer); what the install
        writes elsewhere in the sandbox's root is dropped. Without one uv runs
        here, on hard links of the last environment (it replaces files, never
        rewrites them)."""
        venv = here / "venv"
        scratch = here / "context"
        args, files = list(data["args"]), dict(data["files"])
        if self.run_in_sandbox is None:
            log(NO_BUILD_SANDBOX_PIP.format(user=_user()))
            await asyncio.to_thread(run_layers.link_tree, Path(state.venv), venv)
            scratch.mkdir()
            await pip.install(venv, args, files, log, scratch)
            shutil.rmtree(scratch, ignore_errors=True)
            return venv
        await asyncio.to_thread(_copy_tree, Path(state.venv), venv)
        scratch.mkdir()
        plan = pip.sandboxed_install(
            venv, args, files, scratch, self.cache.root.parent / pip.BUILD_UV_CACHE
        )
        log(f"$ uv pip install {' '.join(plan.argv[5:])}  (in a build sandbox)\n")
        root = here / "build-root"
        try:
            code = await self.run_in_sandbox(
                plan.argv,
                {**state.env, **plan.env, "PATH": ":".join([f"{venv}/bin", *STANDARD_PATH])},
                "/",
                root,
                [Path(p) for p in state.layers],
                list(state.prefixes),
                plan.rw,
                log,
                ro=plan.ro,
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, root, True)
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        if code != 0:
            raise BuildStepError(
                f"pip install failed (uv exit code {code}); see the build log above"
            )
        return venv

    async def _apt(self, state: ImageState, packages: list[str], here: Path, log: Log) -> list[str]:
        """An ``apt_install`` layer (``here/fs``); returns the image's layers with it.

        With a build sandbox (an isolated server), dpkg installs the fetched
        packages in it as apt-get would in Modal's build: over the layers so far,
        ``/usr`` and ``/etc`` writable overlays whose changes (files, the
        alternatives' links, whiteouts) become the layer's, so maintainer scripts
        and triggers run there, never on this machine. Without one they are only
        unpacked (`apt.unpack_packages`, which says which scripts were not run)."""
        from . import apt

        fs = here / "fs"
        cache_dir = self.cache.root.parent / "apt"  # apt's private lists and archives

        def line(text: str) -> None:  # apt's log gives lines without their newline
            log(text if text.endswith("\n") else text + "\n")

        what = f"apt_install({', '.join(packages)})"
        try:
            if self.run_in_sandbox is None:
                fs.mkdir(parents=True, exist_ok=True)
                line(
                    "apt: this local server has no build sandbox (it cannot isolate sandboxes), "
                    "so the packages are unpacked and their maintainer scripts are not run"
                )
                await asyncio.to_thread(
                    apt.unpack_packages, packages, fs, cache_dir=cache_dir, log=line
                )
                return [*state.layers, str(fs)]
            t0 = asyncio.get_running_loop().time()
            fetched = await asyncio.to_thread(
                apt.fetch_packages, packages, cache_dir=cache_dir, log=line
            )
            if not fetched:
                fs.mkdir(parents=True, exist_ok=True)
                return [*state.layers, str(fs)]
            scratch = here / "install"
            debs = scratch / "debs"
            seed = scratch / "seed"

            def stage() -> list[str]:
                debs.mkdir(parents=True)
                names = []
                for i, (_name, path) in enumerate(fetched):
                    name = f"{i:04d}_{path.name}"  # apt's plan order
                    try:
                        os.link(path, debs / name)
                    except OSError:
                        shutil.copy2(path, debs / name)
                    names.append(f"{apt.DEBS_AT}/{name}")
                apt.seed_dpkg_state(seed)
                return names

            in_sandbox = await asyncio.to_thread(stage)
            uppers = {d: here / "upper" / d.strip("/") for d in ("/usr", "/etc")}
            env = {
                **state.env,
                "PATH": ":".join(STANDARD_PATH),
                "DEBIAN_FRONTEND": "noninteractive",
                "DEBCONF_NONINTERACTIVE_SEEN": "true",
            }
            line(f"apt: installing {len(fetched)} packages with dpkg in a build sandbox")
            output: list[str] = []

            def tee(text: str) -> None:
                output.append(text)
                log(text)

            code = await self.run_in_sandbox(
                apt.dpkg_install_argv(in_sandbox),
                env,
                "/",
                fs,
                [seed, *(Path(p) for p in state.layers)],
                state.ro_dirs,
                {},
                tee,
                uppers=uppers,
                ro={apt.DEBS_AT: debs},  # read-only: they are hard links into apt's cache
            )
            await asyncio.to_thread(apt.finish_layer, fs, uppers)
            await asyncio.to_thread(shutil.rmtree, scratch, True)
            apt.check_dpkg(code, "".join(output), packages, line)
            elapsed = asyncio.get_running_loop().time() - t0
            line(f"apt: {' '.join(packages)} installed in {elapsed:.1f} s")
        except apt.AptError as exc:
            raise ImageBuildError(f"{what} failed: {exc}") from None
        return [*state.layers, str(fs)]

    async def _run(self, state: ImageState, command: str, here: Path, log: Log) -> list[str]:
        """A ``run_commands`` line in a build sandbox over the image so far; returns
        the image's layers with the new one (``here/fs``).

        Its root, as the command leaves it, is the layer (a full root: it began as a
        copy of the earlier layers' files), so no earlier layer is copied in again
        (a file the command removed stays removed). ``/usr`` and ``/etc``
        (`run_layers.WRITABLE_VIEW`) are writable overlays over the earlier layers' files
        there and the host's, whose changes land in the layer, as ``apt_install``'s
        do; the earlier layers' files there stay shown below it
        (`run_layers.view_parts`): an ``apt_install``'s ``/usr/bin/jq`` is not lost."""
        if self.run_in_sandbox is None:
            raise ImageBuildError(
                f"run_commands({command!r}): build commands run in an isolated build sandbox, "
                "and this local server cannot isolate sandboxes (see its log)"
            )
        venv = here / "venv"
        await asyncio.to_thread(_copy_tree, Path(state.venv), venv)
        env = {**state.env, "PATH": ":".join([f"{venv}/bin", *STANDARD_PATH])}
        uppers = {d: here / "upper" / d.strip("/") for d in run_layers.WRITABLE_VIEW}
        log(f"$ {command}\n")
        fs = here / "fs"
        code = await self.run_in_sandbox(
            ["/bin/sh", "-c", command],
            env,
            state.workdir or "/",
            fs,
            [Path(p) for p in state.layers],
            list(state.prefixes),
            {str(venv): venv},
            log,
            uppers=uppers,
        )
        if code != 0:
            raise ImageBuildError(
                f"run_commands: {command!r} failed with exit code {code}; see the build log"
            )
        below = await asyncio.to_thread(
            run_layers.view_parts, [Path(p) for p in state.layers], here / "below"
        )
        await asyncio.to_thread(run_layers.take_uppers, fs, uppers)
        return [*below, str(fs)]


def _absolute(path: str, current: str) -> str:
    import posixpath

    return posixpath.normpath(posixpath.join(current or "/", path))
