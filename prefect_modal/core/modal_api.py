"""The only module that calls the modal SDK.

Everything above it (task runner, worker, CLI) speaks in `SandboxSpec`s, names
and ids; everything Modal-specific (clients, apps, images, secrets, volumes,
sandbox handles, log streams) is created and consumed here.  That keeps a
Modal client upgrade to one file, and it is why the rest of the package can be
tested for its own logic while this file is tested against the local server
with the real client.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import modal
import modal.config
import modal.exception
from grpclib import GRPCError, Status
from modal_proto import api_pb2

from prefect_modal.core.errors import PrefectModalError
from prefect_modal.core.spec import SandboxSpec
from prefect_modal.core.tags import valid_tags

#: Packages the default image always has: the per-step bootstrap needs
#: cloudpickle to read its payload; nothing else of ours is needed remotely.
BASE_PIP_PACKAGES: tuple[str, ...] = ("cloudpickle",)

#: What `local_python_sources` leave out of the image: bytecode, which Python remakes.
LOCAL_SOURCE_IGNORE: tuple[str, ...] = ("**/__pycache__", "**/*.pyc")

#: How many trailing output lines a handle keeps for error messages.
TAIL_LINES = 40

#: An image still building after this long gets a line in the run's log (a
#: first build of a default image with prefect in it takes tens of seconds;
#: a cached one is found in milliseconds and says nothing).
BUILD_NOTICE_AFTER_S = 2.0
#: ...and another line this often while the build goes on.
BUILD_PROGRESS_EVERY_S = 30.0

logger = logging.getLogger("prefect_modal.sandboxes")

NotFoundError = modal.exception.NotFoundError
AlreadyExistsError = modal.exception.AlreadyExistsError
SandboxTimeoutError = modal.exception.SandboxTimeoutError
SandboxTerminatedError = modal.exception.SandboxTerminatedError
AuthError = modal.exception.AuthError
ResourceExhaustedError = modal.exception.ResourceExhaustedError

#: How long a create keeps trying while Modal refuses it for capacity: the
#: workspace's sandbox creation rate, or its caps on running sandboxes and GPUs
#: (``ResourceExhaustedError``, "Sandbox creation rate limit exceeded").  The
#: client does not retry that status (``modal/_utils/grpc_utils.py`` retries
#: transient ones only), so a map of many tasks would fail on its first burst.
CREATE_RETRY_SECONDS = 120.0
#: First and largest pause between those tries (doubling, with jitter).
CREATE_BACKOFF_S = (0.5, 8.0)


class SandboxCapacityError(PrefectModalError, RuntimeError):
    """Modal kept refusing a sandbox for capacity for `CREATE_RETRY_SECONDS`."""


def _create_with_backoff(create: Callable[[], modal.Sandbox]) -> modal.Sandbox:
    """`create()`, tried again with exponential backoff while Modal answers
    `ResourceExhaustedError`, up to `CREATE_RETRY_SECONDS`; then Modal's message and
    the bound."""
    started = time.monotonic()
    delay, longest = CREATE_BACKOFF_S
    tries = 0
    while True:
        tries += 1
        try:
            return create()
        except ResourceExhaustedError as exc:
            left = started + CREATE_RETRY_SECONDS - time.monotonic()
            if left <= 0:
                raise SandboxCapacityError(
                    f"Modal refused to create the sandbox: {exc} (still refused after "
                    f"{tries} tries over {CREATE_RETRY_SECONDS:g} s). Modal limits how fast "
                    "a workspace creates sandboxes and how many (and GPUs) run at once: "
                    "lower max_parallelism, or ask Modal for higher limits."
                ) from exc
            pause = min(left, delay * random.uniform(0.5, 1.0))
            logger.info(
                "prefect-modal: Modal refused a sandbox for capacity (%s); try %d again in %.1f s",
                exc,
                tries + 1,
                pause,
            )
            time.sleep(pause)
            delay = min(delay * 2, longest)


def connect(
    server_url: str | None = None,
    token_id: str | None = None,
    token_secret: str | None = None,
) -> modal.Client:
    """Open a `modal.Client` for a token pair, or for Modal's ambient config.

    Never the process-wide `Client.from_env()` singleton: a process may talk to
    the local server and to Modal (or two workspaces) at once.
    """
    url = server_url or modal.config.config["server_url"]
    if not (token_id and token_secret):
        token_id = modal.config.config.get("token_id")
        token_secret = modal.config.config.get("token_secret")
    if not (token_id and token_secret):
        raise AuthError(
            "No Modal token found. Run `modal token new`, set MODAL_TOKEN_ID and "
            "MODAL_TOKEN_SECRET, or save a ModalCredentials block and pass it."
        )
    client = modal.Client(url, api_pb2.CLIENT_TYPE_CLIENT, (token_id, token_secret))
    client.__enter__()
    return client


def verify(client: modal.Client) -> None:
    """Make one cheap authenticated call so bad credentials fail here, early.

    Raises `AuthError` when the server refuses the token.  A server that does
    not implement the hello call (an older local server) counts as reachable.
    """
    try:
        client.hello()
    except GRPCError as exc:
        if exc.status != Status.UNIMPLEMENTED:
            raise


def server_url(client: modal.Client) -> str:
    """The control-plane URL a client was opened for.

    The synchronicity wrapper (`modal.Client`) does not expose the wrapped
    `_Client`'s attributes, so read it from the implementation object.
    """
    url = getattr(client, "server_url", None)
    if url is None:
        from modal._utils.async_utils import synchronizer

        url = synchronizer._translate_in(client).server_url
    return str(url)


def lookup_app(spec: SandboxSpec, client: modal.Client) -> modal.App:
    """The app the sandbox belongs to, created on first use."""
    return modal.App.lookup(
        spec.effective_app_name,
        create_if_missing=True,
        client=client,
        environment_name=spec.modal_environment,
    )


def describe_image(spec: SandboxSpec) -> str:
    """A short description of `spec`'s image for log lines (no secrets: specs hold none)."""
    if spec.image:
        return repr(spec.image)
    packages = [*BASE_PIP_PACKAGES, *(spec.pip_packages or [])]
    more = f" and {len(packages) - 4} more" if len(packages) > 4 else ""
    shown = ", ".join(packages[:4]) + more
    text = f"debian_slim(python_version={spec.effective_python_version!r}) + pip_install({shown})"
    if spec.local_python_sources:
        text += f" + add_local_python_source({', '.join(spec.local_python_sources)})"
    return text


def _hydrated(obj: Any) -> bool:
    """Whether a modal object is loaded (the client's public API has only object_id)."""
    try:
        return bool(obj.object_id)
    except AttributeError:
        return False


def ensure_built(
    image: modal.Image, app: modal.App, log: Callable[[str], None], what: str
) -> modal.Image:
    """Build `image` now (or find it built), telling `log` when that takes a while.

    Why: `Sandbox.create` builds a missing image silently unless the process has
    `modal.enable_output()`, so a run whose first build takes a minute looks
    hung in the Prefect UI. Building first, with a line after
    `BUILD_NOTICE_AFTER_S` and every `BUILD_PROGRESS_EVERY_S`, puts the wait in
    the run's log; a built image costs one lookup and logs nothing.
    """
    if _hydrated(image):
        return image
    done = threading.Event()
    started = time.monotonic()
    announced = threading.Event()

    def watch() -> None:
        if done.wait(BUILD_NOTICE_AFTER_S):
            return
        announced.set()
        log(f"Building image {what} (a first build; later sandboxes use the cached image)")
        while not done.wait(BUILD_PROGRESS_EVERY_S):
            log(f"Still building image {what} ({time.monotonic() - started:.0f}s so far)")

    watcher = threading.Thread(target=watch, name="prefect-modal-image-build", daemon=True)
    watcher.start()
    try:
        image.build(app)
    except modal.exception.ImageBuildError as exc:
        done.set()
        watcher.join()
        log(f"Building image {what} failed after {time.monotonic() - started:.1f}s: {exc}")
        raise
    finally:
        done.set()
        watcher.join()
    if announced.is_set():
        log(f"Built image {image.object_id} in {time.monotonic() - started:.1f}s")
    return image


def build_image(spec: SandboxSpec) -> modal.Image:
    """The image a sandbox runs: a registry image, or debian_slim with our Python.

    A registry image gets `add_python` left to the user (their image decides);
    the default image pins the local Python minor version so that cloudpickled
    functions load (pickles are not portable across minor versions).
    """
    packages = [*BASE_PIP_PACKAGES, *(spec.pip_packages or [])]
    image: modal.Image
    if spec.image:
        secret = (
            modal.Secret.from_name(spec.registry_secret, environment_name=spec.modal_environment)
            if spec.registry_secret
            else None
        )
        image = modal.Image.from_registry(spec.image, secret=secret)
        if spec.pip_packages:
            image = image.pip_install(*spec.pip_packages)
        return image
    image = modal.Image.debian_slim(python_version=spec.effective_python_version).pip_install(
        *packages
    )
    if spec.local_python_sources:
        # their data files too (Modal's default keeps only .py files; prefect_modal
        # reads its price table, for one), without bytecode caches
        image = image.add_local_python_source(
            *spec.local_python_sources, ignore=list(LOCAL_SOURCE_IGNORE)
        )
    return image


def resolve_secrets(
    spec: SandboxSpec, extra_secret_env: dict[str, str] | None = None
) -> list[modal.Secret]:
    """Named secrets, plus secret-looking env values sent as one `Secret.from_dict`."""
    secrets = [
        modal.Secret.from_name(name, environment_name=spec.modal_environment)
        for name in spec.secrets or []
    ]
    values = {**spec.secret_env(), **(extra_secret_env or {})}
    if values:
        secrets.append(modal.Secret.from_dict(values))  # type: ignore[arg-type]
    return secrets


def resolve_volumes(
    spec: SandboxSpec, client: modal.Client | None = None
) -> dict[str | Any, modal.Volume]:
    return {
        path: named_volume(name, client, spec.modal_environment)
        for path, name in (spec.volumes or {}).items()
    }


#: Volumes known to exist, by (client, environment, name): a lookup per create is enough.
_existing_volumes: set[tuple[int, str | None, str]] = set()
_existing_lock = threading.Lock()


def named_volume(
    name: str, client: modal.Client | None, environment_name: str | None = None
) -> modal.Volume:
    """The named volume; one that does not exist yet is created as a v2 volume.

    Why v2: an unversioned volume is v1 (``modal/volume.py``,
    ``_validate_volume_version``), and a v1 volume receives a sandbox's writes only
    when the sandbox ends ("files are only synced back to the Volume when the
    Sandbox terminates", Modal's guide, Sandbox files).  Results by reference and
    ad-hoc flow values are written by a running sandbox (a warm one keeps running)
    and read at once, so they need v2, whose writes a ``sync`` of the mount commits.
    An existing volume keeps its version: it is the user's.
    """
    key = (id(client), environment_name, name)
    with _existing_lock:
        known = key in _existing_volumes
    if not known:
        try:
            modal.Volume.from_name(name, environment_name=environment_name, client=client).hydrate(
                client=client
            )
        except NotFoundError:
            modal.Volume.objects.create(
                name,
                version=2,
                allow_existing=True,
                environment_name=environment_name,
                client=client,
            )
        with _existing_lock:
            _existing_volumes.add(key)
    return modal.Volume.from_name(name, environment_name=environment_name, client=client)


def create_sandbox(
    spec: SandboxSpec,
    command: Sequence[str],
    *,
    client: modal.Client,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    extra_env: dict[str, str] | None = None,
    extra_secret_env: dict[str, str] | None = None,
    app: modal.App | None = None,
    image: modal.Image | None = None,
    log: Callable[[str], None] | None = None,
) -> modal.Sandbox:
    """Create one sandbox running `command`, named and tagged so it can be found again.

    `extra_env` / `extra_secret_env` are the caller's additions (e.g. Prefect's
    API URL / API key); secrets always travel as a `modal.Secret`.
    Raises `AlreadyExistsError` when a sandbox of that name is running.
    With `log`, a long image build is reported there (`ensure_built`).
    """
    app = app or lookup_app(spec, client)
    image = image or build_image(spec)
    if log is not None:
        ensure_built(image, app, log, describe_image(spec))
    kwargs = spec.sandbox_kwargs()
    env = {**(kwargs.pop("env") or {}), **(extra_env or {})}
    kwargs.pop("secrets")
    kwargs.pop("volumes")
    return _create_with_backoff(
        lambda: modal.Sandbox.create(
            *command,
            app=app,
            image=image,
            name=name,
            tags=valid_tags(tags) if tags else None,
            env=env or None,  # type: ignore[arg-type]
            secrets=resolve_secrets(spec, extra_secret_env),
            volumes=resolve_volumes(spec, client),
            client=client,
            **kwargs,
        )
    )


def from_id(sandbox_id: str, client: modal.Client) -> modal.Sandbox:
    return modal.Sandbox.from_id(sandbox_id, client=client)


def from_name(
    app_name: str, name: str, client: modal.Client, environment_name: str | None = None
) -> modal.Sandbox | None:
    """The running sandbox of that name, or None: how a restarted process finds its work."""
    try:
        return modal.Sandbox.from_name(
            app_name, name, environment_name=environment_name, client=client
        )
    except NotFoundError:
        return None


def list_sandboxes(
    tags: dict[str, str],
    client: modal.Client,
    app: modal.App | None = None,
) -> list[modal.Sandbox]:
    """Running sandboxes carrying at least `tags` (optionally in one app)."""
    return list(
        modal.Sandbox.list(app_id=app.app_id if app else None, tags=valid_tags(tags), client=client)
    )


def terminate(sandbox: modal.Sandbox) -> None:
    """Terminate, tolerating a sandbox that has already finished, vanished, or been
    detached (which we do only once it has finished)."""
    try:
        sandbox.terminate()
    except (NotFoundError, modal.exception.ClientClosed):
        pass


def detach(sandbox: modal.Sandbox) -> None:
    """Let go of a sandbox this process is done with.

    The modal client otherwise keeps the sandbox's command-router connection
    open (with keepalive pings) for 30 s after its last use: a map of hundreds
    of short tasks would hold hundreds of sockets and spend its CPU on pings.
    """
    try:
        sandbox.detach()
    except Exception as exc:  # never worth failing a finished call for
        logger.debug("detaching sandbox %s failed: %s", sandbox_id(sandbox), exc)


def terminate_by_id(sandbox_id: str, client: modal.Client) -> bool:
    """Terminate a sandbox by id; False if Modal no longer knows it."""
    try:
        terminate(from_id(sandbox_id, client))
    except NotFoundError:
        return False
    return True


@dataclass
class OutputTail:
    """The last lines a sandbox printed, kept for crash messages."""

    limit: int = TAIL_LINES
    lines: deque[str] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)
            while len(self.lines) > self.limit:
                self.lines.popleft()

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


def iter_lines(chunks: Iterable[str]) -> Iterator[str]:
    """Re-split a stream of text chunks into lines (chunks cut lines anywhere)."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split("\n")
        yield from complete
    if pending:
        yield pending


def stream_output(
    sandbox: modal.Sandbox,
    on_line: Callable[[str, str], None],
    tail: OutputTail | None = None,
) -> list[threading.Thread]:
    """Follow stdout and stderr in two daemon threads, one callback per line.

    `on_line(stream_name, line)` gets "stdout" or "stderr".  Returns the
    threads; join them after `wait()` to be sure every line was delivered.
    """

    def follow(name: str, reader: Any) -> None:
        try:
            for line in iter_lines(reader):
                if tail is not None:
                    tail.add(line)
                on_line(name, line)
        except UnicodeDecodeError as exc:  # modal/io_streams.py decodes strictly
            on_line(
                "stderr",
                f"[prefect-modal] the sandbox wrote bytes that are not UTF-8 to its {name} "
                f"({exc.reason} at byte {exc.start}); Modal's reader stops there, so later "
                "output is not forwarded (the exit code and the run's state still are)",
            )
        except Exception as exc:  # a dropped stream must not kill the caller
            on_line("stderr", f"[prefect-modal] output stream {name} ended early: {exc}")

    threads = [
        threading.Thread(target=follow, args=("stdout", sandbox.stdout), daemon=True),
        threading.Thread(target=follow, args=("stderr", sandbox.stderr), daemon=True),
    ]
    for t in threads:
        t.start()
    return threads


def dashboard_url(sandbox_id: str, app_name: str, server_url: str | None = None) -> str:
    """Where a person looks at a sandbox: Modal's dashboard, or the CLI for the local server."""
    if server_url and "modal.com" not in server_url:
        return f"prefect-modal logs {sandbox_id}"
    return f"https://modal.com/apps?sandbox={sandbox_id}&app={app_name}"


# -- used by the worker (pipeline mode) ------------------------------------------


def poll(sandbox: modal.Sandbox) -> int | None:
    """The exit code, or None while the sandbox runs (one cheap call)."""
    return sandbox.poll()


def list_in_app(
    app_name: str,
    tags: dict[str, str],
    client: modal.Client,
    environment_name: str | None = None,
) -> list[modal.Sandbox]:
    """Running sandboxes of one app carrying at least `tags`.

    Scoped to an app because listing a whole environment is deprecated by Modal;
    an app that does not exist yet simply has no sandboxes.
    """
    try:
        app = modal.App.lookup(
            app_name, create_if_missing=False, client=client, environment_name=environment_name
        )
    except NotFoundError:
        return []
    return list_sandboxes(tags, client, app=app)


def read_output_tail(sandbox: modal.Sandbox, limit: int = TAIL_LINES) -> str:
    """The last lines of a *finished* sandbox's stdout and stderr (blocks on a running one).

    Used to explain a crash found after the fact, when nobody streamed the output.
    """
    parts: list[str] = []
    for name, reader in (("stdout", sandbox.stdout), ("stderr", sandbox.stderr)):
        tail = OutputTail(limit=limit)
        try:
            for line in iter_lines([reader.read()]):
                tail.add(line)
        except Exception as exc:  # output can expire on Modal; the exit code still counts
            tail.add(f"[prefect-modal] {name} could not be read: {exc}")
        if tail.lines:
            parts.append(f"--- {name} ---\n{tail.text()}")
    return "\n".join(parts)


# -- per-step calls: one short sandbox per task call ----------------------------------

_prepared_lock = threading.Lock()
_prepared: dict[tuple[Any, ...], tuple[modal.Client, modal.App, modal.Image]] = {}


def prepare(
    spec: SandboxSpec, client: modal.Client, log: Callable[[str], None] | None = None
) -> tuple[modal.App, modal.Image]:
    """The app and image for `spec`, looked up once per client and reused.

    A per-step runner creates hundreds of sandboxes from a handful of specs; a
    hydrated `modal.Image` / `modal.App` skips the lookup RPCs on every later
    create, which is most of the per-task cost on a fast server. With `log`, the
    image is built here and a long build is reported there (`ensure_built`).
    """
    key = (
        id(client),
        spec.effective_app_name,
        spec.modal_environment,
        spec.image,
        spec.registry_secret,
        spec.effective_python_version,
        tuple(spec.pip_packages or ()),
        tuple(spec.local_python_sources or ()),
    )
    with _prepared_lock:
        hit = _prepared.get(key)
        if hit is not None and hit[0] is client:
            return hit[1], hit[2]
    app, image = lookup_app(spec, client), build_image(spec)
    if log is not None:
        ensure_built(image, app, log, describe_image(spec))
    with _prepared_lock:
        _prepared[key] = (client, app, image)
    return app, image


def sandbox_id(sandbox: modal.Sandbox) -> str:
    return str(sandbox.object_id)


#: Largest piece written to a sandbox's stdin before a drain.  The client refuses to
#: buffer more than 2 MiB between drains on the V1 back end (GPU, PTY and NFS
#: sandboxes; ``modal/io_streams.py``, ``MAX_BUFFER_SIZE``) and 16 MiB on V2
#: (``TASK_COMMAND_ROUTER_MAX_BUFFER_SIZE``): 1 MiB is under both.
STDIN_CHUNK = 1024 * 1024


def send_stdin(
    sandbox: modal.Sandbox, data: bytes, eof: bool = True, chunk: int = STDIN_CHUNK
) -> None:
    """Write `data` of any size to the sandbox's stdin, each `chunk` drained, then close
    it unless more is to come (the bootstrap reads to a size; a call that may submit
    nested tasks reads replies)."""
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        sandbox.stdin.write(bytes(view[start : start + chunk]))
        if start + chunk < len(view) or not eof:
            sandbox.stdin.drain()
    if eof:
        sandbox.stdin.write_eof()
        sandbox.stdin.drain()


def follow_stdout(sandbox: modal.Sandbox, on_chunk: Callable[[str], None]) -> None:
    """Call `on_chunk` for each piece of stdout as it arrives, until the stream ends."""
    for chunk in sandbox.stdout:
        on_chunk(chunk)


def follow_stderr(sandbox: modal.Sandbox, on_line: Callable[[str], None]) -> None:
    """Call `on_line` for each stderr line until the stream ends (blocking)."""
    for line in iter_lines(sandbox.stderr):
        on_line(line)


def read_stdout(sandbox: modal.Sandbox) -> str:
    """All of stdout (blocking until it ends): for a process that has exited, at once."""
    return "".join(sandbox.stdout)


def wait_returncode(sandbox: modal.Sandbox) -> int | None:
    """Block until the sandbox ends; its exit code (137 terminated, 124 timed out).

    A sandbox that reached its `timeout` makes ``wait()`` raise `SandboxTimeoutError`
    even with ``raise_on_termination=False`` (``modal/sandbox/_common.py``,
    ``raise_for_wait_result``); its result is kept, and ``returncode`` says 124."""
    try:
        sandbox.wait(raise_on_termination=False)
    except SandboxTimeoutError:
        pass
    return sandbox.returncode


def returncode_by_id(sandbox_id: str, client: modal.Client) -> int | None:
    """None while the sandbox runs, else its exit code.  Raises NotFoundError."""
    return from_id(sandbox_id, client).poll()


def sandbox_tags(sandbox: modal.Sandbox) -> dict[str, str]:
    return dict(sandbox.get_tags())


# -- sessions: a long-lived idle sandbox driven by exec and file calls ----------------

#: Filesystem errors of a session, translated to Python's own where one fits.
SandboxFilesystemError = modal.exception.SandboxFilesystemError


def build_session_image(spec: SandboxSpec) -> modal.Image:
    """A session's image: the spec's registry image, or debian_slim with the spec's
    packages only (a session runs the user's commands, never our bootstrap, so it
    needs no cloudpickle)."""
    if spec.image:
        return build_image(spec)
    image = modal.Image.debian_slim(python_version=spec.effective_python_version)
    if spec.pip_packages:
        image = image.pip_install(*spec.pip_packages)
    return image


def image_from_id(image_id: str, client: modal.Client) -> modal.Image:
    """A snapshot's image, by id (valid only on the Modal that took it)."""
    return modal.Image.from_id(image_id, client=client)


def create_session_sandbox(
    spec: SandboxSpec,
    *,
    client: modal.Client,
    tags: dict[str, str],
    image_id: str | None = None,
    block_network: bool = False,
) -> modal.Sandbox:
    """An idle sandbox (Modal's default entrypoint) for a session to exec into.

    `image_id` starts it from a snapshot instead of the spec's image.
    """
    image = image_from_id(image_id, client) if image_id else build_session_image(spec)
    kwargs = spec.sandbox_kwargs()
    env = kwargs.pop("env") or None
    kwargs.pop("secrets")
    kwargs.pop("volumes")
    app = lookup_app(spec, client)
    return _create_with_backoff(
        lambda: modal.Sandbox.create(
            app=app,
            image=image,
            tags=valid_tags(tags),
            env=env,
            secrets=resolve_secrets(spec),
            volumes=resolve_volumes(spec, client),
            block_network=block_network,
            client=client,
            **kwargs,
        )
    )


def exec_process(
    sandbox: modal.Sandbox,
    command: Sequence[str],
    *,
    workdir: str | None = None,
    env: dict[str, str] | None = None,
    timeout: int | None = None,
) -> Any:
    """Start a command in a running sandbox; the handle has stdout, stderr, wait()."""
    return sandbox.exec(*command, workdir=workdir, env=env, timeout=timeout)  # type: ignore[arg-type]


def process_wait(process: Any) -> int:
    return int(process.wait())


def snapshot_filesystem(sandbox: modal.Sandbox) -> str:
    """Snapshot the sandbox's filesystem; the id of the image that starts from it."""
    return str(sandbox.snapshot_filesystem().object_id)


def _translated(path: str, exc: Exception) -> Exception:
    """Modal's filesystem errors as the Python errors a file API user expects."""
    if isinstance(exc, modal.exception.SandboxFilesystemNotFoundError):
        return FileNotFoundError(2, "No such file or directory in the sandbox", path)
    if isinstance(exc, modal.exception.SandboxFilesystemNotADirectoryError):
        return NotADirectoryError(20, "Not a directory in the sandbox", path)
    if isinstance(exc, modal.exception.SandboxFilesystemIsADirectoryError):
        return IsADirectoryError(21, "Is a directory in the sandbox", path)
    if isinstance(exc, modal.exception.SandboxFilesystemPermissionError):
        return PermissionError(13, "Permission denied in the sandbox", path)
    return exc


def fs_write_bytes(sandbox: modal.Sandbox, path: str, data: bytes) -> None:
    try:
        sandbox.filesystem.write_bytes(data, path)
    except SandboxFilesystemError as exc:
        raise _translated(path, exc) from exc


def fs_read_bytes(sandbox: modal.Sandbox, path: str) -> bytes:
    try:
        return bytes(sandbox.filesystem.read_bytes(path))
    except SandboxFilesystemError as exc:
        raise _translated(path, exc) from exc


def fs_list(sandbox: modal.Sandbox, path: str) -> list[dict[str, Any]]:
    """Entries of a directory as plain dicts (name, path, type, size, modified_time)."""
    try:
        entries = sandbox.filesystem.list_files(path)
    except SandboxFilesystemError as exc:
        raise _translated(path, exc) from exc
    return [
        {
            "name": e.name,
            "path": e.path,
            "type": getattr(e.type, "value", str(e.type)),
            "size": e.size,
            "modified_time": e.modified_time,
        }
        for e in entries
    ]


def fs_remove(sandbox: modal.Sandbox, path: str, recursive: bool = False) -> None:
    try:
        sandbox.filesystem.remove(path, recursive=recursive)
    except SandboxFilesystemError as exc:
        raise _translated(path, exc) from exc


# -- volumes as file stores (the `ModalVolume` block, results by reference) -----------


def volume(name: str, client: modal.Client, environment_name: str | None = None) -> modal.Volume:
    """The named volume (created on first use, as v2: `named_volume`), hydrated so later
    calls skip the lookup."""
    vol = named_volume(name, client, environment_name)
    vol.hydrate(client=client)
    return vol


def volume_read(vol: modal.Volume, path: str) -> bytes:
    """A file's bytes; FileNotFoundError (naming the path) when it is not there."""
    return b"".join(vol.read_file(path))


def volume_write(vol: modal.Volume, path: str, data: bytes) -> None:
    """Write (or replace) one file from memory."""
    with vol.batch_upload(force=True) as batch:
        batch.put_file(io.BytesIO(data), path)


def volume_put_directory(vol: modal.Volume, local_dir: str, remote_dir: str) -> None:
    with vol.batch_upload(force=True) as batch:
        batch.put_directory(local_dir, remote_dir)


def volume_list(
    vol: modal.Volume, path: str, recursive: bool = False
) -> list[tuple[str, bool, int]]:
    """(path, is_directory, size) of the entries under `path`; NotFoundError if missing."""
    return [
        (e.path, e.type == modal.volume.FileEntryType.DIRECTORY, int(e.size))
        for e in vol.listdir(path, recursive=recursive)
    ]


def volume_remove(vol: modal.Volume, path: str, recursive: bool = False) -> None:
    vol.remove_file(path, recursive=recursive)
