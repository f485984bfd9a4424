"""Background services the demo (and tests) start: Prefect server, local Modal, worker.

Each runs as its own process group on 127.0.0.1, with its output in a log
file, and is stopped by its pid (its group), never by name: a user may have
their own Prefect server or worker running, and we must not touch it.

Being their own sessions, they do not receive the signals of the terminal or
process that started them.  So the starter stops them: `stop_on_signals`
turns SIGTERM and SIGHUP (a closed terminal) into the KeyboardInterrupt that
Ctrl-C raises, so the starter's ``finally`` blocks run, and every service
still running when the interpreter exits is stopped by an ``atexit`` hook.

A starter that cannot run any of that (SIGKILL, a crash, an OOM kill) must
not leave them running either: each service gets ``PR_SET_PDEATHSIG``, so the
kernel sends it SIGTERM when its starter dies, and it stops as it would for
`Service.stop` (what it started itself goes with it: the local Modal server's
sandboxes and fork server die with it, see `prefect_modal.local.runtime.processes`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

from prefect_modal.core.errors import PrefectModalError

VENV_BIN = Path(sys.executable).parent


class ServiceError(PrefectModalError, RuntimeError):
    """A service did not come up; the message says which, and where its log is."""


def free_port() -> int:
    """A port nobody listens on now (bound on 127.0.0.1 only)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def tool(name: str) -> str:
    """A console script of this environment (prefect, prefect-modal)."""
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else name


@dataclass(eq=False)
class Service:
    """One started process group, its log, and how to reach it."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15, sig: int = signal.SIGTERM) -> None:
        """`sig` (SIGTERM) to the group, SIGKILL what is left after `timeout`, reap the leader.

        `sig=signal.SIGKILL` stops it as a crash would: no cleanup runs."""
        _started.discard(self)
        if self.process.poll() is None:
            _signal_group(self.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.process.wait(10)
        _signal_group(self.pid, signal.SIGKILL)  # stragglers of the group
        if self._log is not None:
            self._log.close()


#: Services started by this process and not stopped yet (stopped at exit).
_started: set[Service] = set()


def _stop_all_started() -> None:
    for service in list(_started):
        try:
            service.stop(timeout=10)
        except Exception:  # pragma: no cover - best effort at exit
            pass


atexit.register(_stop_all_started)

#: The signals that stop a program that started services: Ctrl-C, `kill`, a closed terminal.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGHUP, as Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for "ended by signal N"."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Stopped` (SIGINT: KeyboardInterrupt).

    Only the first signal raises: a second one while the ``finally`` blocks
    stop services would interrupt the stopping.  Outside the main thread
    (signals cannot be handled there) it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, _frame: object) -> None:
        nonlocal raised
        if raised:
            return
        raised = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


#: What a service gets when the process that started it dies without stopping it.
#: SIGTERM, not SIGKILL: each service (Prefect's server and worker, the local
#: Modal server) stops on it as on `Service.stop`, and the local server ends
#: its sandboxes' own children then, which a SIGKILL would leave running when
#: its sandboxes are not isolated.
PARENT_DEATH_SIGNAL = signal.SIGTERM
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

try:  # resolved before any fork: a forked child must not dlopen
    _prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _dies_with(parent: int) -> Callable[[], None]:
    """The function a child runs between fork and exec so that it gets
    `PARENT_DEATH_SIGNAL` when `parent` dies (see `_in_spawner_thread` for which thread)."""
    prctl = _prctl

    def preexec() -> None:
        if prctl is None:  # pragma: no cover - not Linux: the atexit hook is all there is
            return
        prctl(_PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0)
        # The parent may have died between fork and prctl: then no signal comes
        # (this child was already re-parented), so end here as the signal would.
        if os.getppid() != parent:
            os._exit(128 + int(PARENT_DEATH_SIGNAL))

    return preexec


_T = TypeVar("_T")
_spawn_requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _serve_spawn_requests() -> None:
    while True:
        start, done = _spawn_requests.get()
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(start())
            except BaseException as exc:
                done.set_exception(exc)


def _in_spawner_thread(start: Callable[[], _T]) -> _T:
    """Run `start` (which forks a child) in the one thread that forks services.

    Why a thread of its own: Linux sends the parent-death signal when the
    *thread* that forked the child ends, not the process. A service started
    from a short-lived thread (a thread pool's, a fixture's) would be killed
    when that thread ends. This daemon thread lives until the process exits.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():  # first use, or in a forked child
            _spawner = threading.Thread(
                target=_serve_spawn_requests, name="prefect-modal-spawner", daemon=True
            )
            _spawner.start()
    done: Future[_T] = Future()
    _spawn_requests.put((start, done))
    return done.result()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def spawn(
    name: str, cmd: list[str], env: Mapping[str, str], log_dir: Path, cwd: Path | None = None
) -> Service:
    """Start `cmd` (in `cwd`) in its own process group, output to `<log_dir>/<name>.log`;
    it gets `PARENT_DEATH_SIGNAL` if this process dies without stopping it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    process = _in_spawner_thread(
        lambda: subprocess.Popen(
            cmd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stopped as a whole, by pid
            cwd=cwd,
            preexec_fn=_dies_with(os.getpid()),
        )
    )
    service = Service(name=name, process=process, log_path=log_path, _log=log)
    _started.add(service)
    return service


def wait_ready(service: Service, ready: Any, timeout: float, what: str) -> None:
    """Poll `ready()` until true; if `service` exits first or `timeout` passes, stop it
    and raise ServiceError with the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            service.stop()
            raise ServiceError(
                f"{service.name} exited with code {service.process.returncode} before {what}. "
                f"Its log ({service.log_path}) ends with:\n{service.log_tail()}"
            )
        if ready():
            return
        time.sleep(0.2)
    service.stop()
    raise ServiceError(
        f"{service.name} did not {what} within {timeout:.0f}s. "
        f"Its log ({service.log_path}) ends with:\n{service.log_tail()}"
    )


def shared_build_caches(env: Mapping[str, str]) -> dict[str, str]:
    """Where `env`'s processes keep built image layers and uv's wheels, spelled out.

    Why: those caches are the machine's, shared by every local server; a process
    given a HOME of its own (`isolated_env`, tests) would otherwise start with
    empty ones and rebuild every image, downloading each wheel again."""
    home = Path(env.get("HOME") or Path.home())
    xdg = env.get("XDG_CACHE_HOME") or str(home / ".cache")
    return {
        "PREFECT_MODAL_IMAGE_CACHE": env.get("PREFECT_MODAL_IMAGE_CACHE")
        or str(home / ".cache" / "prefect-modal" / "images"),
        "UV_CACHE_DIR": env.get("UV_CACHE_DIR") or str(Path(xdg) / "uv"),
    }


def isolated_env(home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (os.environ) without any PREFECT_* or MODAL_* setting, and with its own HOME,
    Modal config and Prefect home under `home`: no developer profile or token leaks in.
    The machine's build caches stay shared (`shared_build_caches`)."""
    env = {
        k: v
        for k, v in (base if base is not None else os.environ).items()
        if not k.startswith(("PREFECT_", "MODAL_"))
    }
    env.update(shared_build_caches(base if base is not None else os.environ))
    env.update(
        HOME=str(home),
        MODAL_CONFIG_PATH=str(home / ".modal.toml"),
        PREFECT_HOME=str(home / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def prefect_env(home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment with its own PREFECT_HOME (own SQLite database, own profile)."""
    env = dict(base if base is not None else os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PYTHONUNBUFFERED="1",
    )
    return env


def start_prefect_server(
    home: Path,
    port: int | None = None,
    timeout: float = 90,
    ui: bool = True,
    base: Mapping[str, str] | None = None,
) -> Service:
    """`prefect server start` on 127.0.0.1 with its own home and database; its
    environment is `base` (os.environ) with `prefect_env`'s settings."""
    port = port or free_port()
    env = prefect_env(home, base)
    env["PREFECT_SERVER_UI_ENABLED"] = "true" if ui else "false"
    env.pop("PREFECT_API_URL", None)
    # The UI asks /ui-settings where the API is; that answer comes from settings,
    # not from `--port`, and would default to :4200 (someone else's server).
    env["PREFECT_SERVER_API_PORT"] = str(port)
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
    # The UI's files: a copy of this server's own. By default Prefect copies them into
    # its installation (site-packages/prefect/server/ui_build) and makes every copied
    # file mode 0700 (prefect/server/api/server.py, copy_directory), so a server of
    # another user of the same installation (a normal user after root) finds a copy it
    # may not read and answers every page with an empty body, or may not write one.
    env.setdefault("PREFECT_UI_STATIC_DIRECTORY", str(home / "ui-static"))
    cmd = [tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    service = spawn("prefect-server", cmd, env, home / "logs")
    service.url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return httpx.get(f"{service.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_ready(service, healthy, timeout, "answered /api/health")
    return service


def start_local_modal(
    state_dir: Path,
    port: int | None = None,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
    host_dirs: Sequence[Path] = (),
    extra_args: Sequence[str] = (),
) -> Service:
    """`prefect-modal local serve` in its own process (environment `env`, default
    os.environ; ``extra_args`` such as ``--retention``); `.env` reaches it.
    ``host_dirs`` are shown read-only to its sandboxes (a deployment's working
    directory, in pipeline mode).

    A process of its own (not a thread of ours) so that a worker or flow that
    is killed leaves the sandboxes running, as they would on Modal.
    """
    port = port or free_port()
    cmd = [
        sys.executable, "-m", "prefect_modal.local", "serve",
        "--port", str(port), "--state-dir", str(state_dir), *extra_args,
    ]  # fmt: skip
    for d in host_dirs:
        cmd += ["--host-dir", str(d)]
    service = spawn("local-modal", cmd, env if env is not None else os.environ, state_dir / "logs")
    exports: dict[str, str] = {}

    def ready() -> bool:
        text = service.log_path.read_text(errors="replace") if service.log_path.exists() else ""
        for line in text.splitlines():
            if line.startswith("export ") and "=" in line:
                key, _, value = line[len("export ") :].partition("=")
                exports[key.strip()] = value.strip().strip("'\"")
        return any(line.startswith("READY ") for line in text.splitlines())

    wait_ready(service, ready, timeout, "printed READY")
    service.url = exports.get("MODAL_SERVER_URL", f"http://127.0.0.1:{port}")
    service.env = exports
    return service


def start_worker(
    pool: str,
    env: Mapping[str, str],
    log_dir: Path,
    worker_type: str = "modal",
    timeout: float = 60,
) -> Service:
    """`prefect worker start --pool P`; ready once it has polled the pool."""
    cmd = [tool("prefect"), "worker", "start", "--pool", pool, "--type", worker_type]
    service = spawn(f"worker-{pool}", cmd, env, log_dir)

    def polling() -> bool:
        return "started!" in service.log_tail(200) or "Worker" in service.log_tail(200)

    wait_ready(service, polling, timeout, "started polling its work pool")
    return service
