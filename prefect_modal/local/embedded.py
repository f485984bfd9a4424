"""`LocalModal`: the local Modal server, embedded in this process.

The grpclib server runs on its own event loop in a background thread, so a
test (or the task runner) can drive the *synchronous* modal client in the main
thread and still read `sandboxes()` directly. Sandbox processes are forked
from that loop thread, which matters for ``PR_SET_PDEATHSIG``: they die with the
server's thread, and `stop()` kills every process group it started.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import secrets as _secrets
import shutil
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpclib.events
from grpclib.server import Server

from .auth import Credentials
from .latency import LatencyModel
from .latency import resolve as resolve_latency
from .limits import Limits
from .records import SandboxRecord
from .retention import Pruner, check_retention
from .runtime import forkserver, processes, tls, userns
from .runtime import isolation as isolation_mod
from .runtime.sandbox import Isolation
from .server import ControlPlane, Router, ServerContext
from .state import DEFAULT_RETENTION_S, Registry

log = logging.getLogger("prefect_modal.local")


class LocalModal:
    """A Modal-compatible server on 127.0.0.1 whose sandboxes are local processes.

    Use it as a context manager::

        with LocalModal(secrets={"db": {"PASSWORD": "x"}}) as lm:
            sb = modal.Sandbox.create("python", "-c", "print(1)", app=..., client=lm.client)

    ``state_dir`` holds ``sandboxes.json``, ``sandboxes/<id>/fs`` (each sandbox's
    root) and ``volumes/<name>``; by default a temporary directory removed on
    `stop()`.

    ``retention_s`` (default an hour) is how long a finished sandbox is kept:
    after it, its record, output and root directory are removed and lookups
    answer NOT_FOUND saying so. 0 or None keeps them until the server stops
    (memory and disk then grow with every sandbox).

    ``limits`` (`limits.Limits`; default: from the ``PREFECT_MODAL_LOCAL_*`` settings
    there) is the workspace's creation throttle, running and GPU caps (off unless
    set) and output window (64 MiB).

    ``trust_env`` (default on): while the server runs, ``SSL_CERT_FILE`` and
    ``REQUESTS_CA_BUNDLE`` of this process name a bundle of this machine's CAs
    plus the server's own (`tls.ProcessTrust`), so ``urllib``, ``requests``,
    ``httpx`` and ``websockets`` reach its tunnels (``https://<host>`` on 443, as on
    Modal) without flags, as they reach Modal's; `stop()` puts the earlier values back.
    """

    def __init__(
        self,
        port: int = 0,
        state_dir: str | Path | None = None,
        secrets: dict[str, dict[str, str]] | None = None,
        refuse_gpu: bool = False,
        host: str = "127.0.0.1",
        fork_server: bool | None = None,
        isolation: bool | None = None,
        host_dirs: Sequence[str | Path] | None = None,
        image_cache: str | Path | None = None,
        retention_s: float | None = DEFAULT_RETENTION_S,
        latency: str | LatencyModel | None = None,
        limits: Limits | None = None,
        trust_env: bool = True,
    ) -> None:
        retention = check_retention(retention_s)
        self._trust_env = trust_env
        self.latency = resolve_latency(latency)
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"host={host!r}: the local Modal server binds to loopback only")
        self._host = host
        self._port = port
        self._own_state_dir = state_dir is None
        self.state_dir = (
            Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="prefect-modal-local-"))
        )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.credentials = Credentials()
        self._server_uid = _secrets.token_hex(6)
        self.registry = Registry(self.state_dir, secrets, retention_s=retention)
        self._pruner = Pruner(self.registry)
        self._ctx = ServerContext(
            self.registry,
            self.credentials,
            refuse_gpu=refuse_gpu,
            server_uid=self._server_uid,
            fork_server=forkserver.enabled_by_default() if fork_server is None else fork_server,
            isolation=isolation_mod.enabled_by_default() if isolation is None else isolation,
            host_dirs=[
                str(d)
                for d in (isolation_mod.host_dirs_from_env() if host_dirs is None else host_dirs)
            ],
            host=host,
            latency=self.latency,
            image_cache=Path(image_cache) if image_cache is not None else None,
            limits=Limits.from_env() if limits is None else limits,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_requested: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._client: Any = None
        self._bound_port: int | None = None
        self._stopped = False

    # ----- lifecycle -------------------------------------------------------

    def start(self) -> LocalModal:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="prefect-modal-local", daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # a forgotten server still kills its sandboxes at exit
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(
                f"the local Modal server failed to start: {self._error}"
            ) from self._error
        if self._bound_port is None:
            raise RuntimeError("the local Modal server did not start within 30 s")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self.registry.loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start() or logged
            self._error = exc
            self._ready.set()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self) -> None:
        self._stop_requested = asyncio.Event()
        await self._ctx.start_isolation()
        await self._ctx.start_limits()
        server = Server([ControlPlane(self._ctx), Router(self._ctx)])
        grpclib.events.listen(server, grpclib.events.RecvRequest, self._ctx.on_request)
        await server.start(self._host, self._port)
        sockets = (
            server._server.sockets if server._server else []
        )  # grpclib keeps the asyncio server
        self._bound_port = sockets[0].getsockname()[1]
        host = "[::1]" if self._host == "::1" else self._host
        self._ctx.url = f"http://{host}:{self._bound_port}"
        self.registry.flush()
        self._pruner.start()
        if self._trust_env:
            tls.ProcessTrust.add(id(self), tls.ensure_ca(self.state_dir))
        self._ready.set()
        try:
            await self._stop_requested.wait()
        finally:
            await self._shutdown(server)

    async def _shutdown(self, server: Server) -> None:
        await self._pruner.stop()
        running = [sb for sb in self.registry.sandboxes.values() if not sb.done.is_set()]
        await asyncio.gather(*(sb.kill_now() for sb in running), return_exceptions=True)
        await self._ctx.probes.close_all()
        await self._ctx.tunnels.close_all()
        await self._ctx.blobs.close()
        if self._ctx.isolation is not None and self._ctx.isolation.netns is not None:
            await self._ctx.isolation.netns.close()  # its namespaces made ahead, their pasta
        await self._ctx.sweeper.drain()
        if self._ctx.forkserver is not None:
            await self._ctx.forkserver.close()
        processes.kill_tree(None, f"{self._server_uid}:")
        await asyncio.gather(
            *(sb.drain_background() for sb in self.registry.sandboxes.values()),
            return_exceptions=True,
        )
        await self._ctx.stop_limits()  # groups left (a supervisor cancelled) and our parents
        server.close()
        try:
            await asyncio.wait_for(server.wait_closed(), 5)
        except asyncio.TimeoutError:
            log.warning("local Modal server: connections did not close within 5 s")
        await self.registry.flushed()  # the final statuses, by the writer (never two at once)

    def stop(self) -> None:
        """Terminate every sandbox process group, stop serving, and clean up."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        if self._client is not None:
            try:
                self._client.close()
            except Exception as exc:  # closing a client must not stop the shutdown
                log.debug("closing the modal client failed: %s", type(exc).__name__)
            self._client = None
        loop, stop = self._loop, self._stop_requested
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(30)
        tls.ProcessTrust.remove(id(self))
        # belt and braces: nothing marked by this server survives it
        processes.kill_tree(None, f"{self._server_uid}:")
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            userns.remove_inside(self.state_dir)  # what a normal user's sandboxes gave away

    def __enter__(self) -> LocalModal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- what callers need -----------------------------------------------

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("LocalModal is not started")
        return self._bound_port

    @property
    def isolation(self) -> Isolation | None:
        """How sandboxes are isolated (their image view, pasta), or None if they are not."""
        return self._ctx.isolation

    @property
    def image_builds(self) -> dict[str, int]:
        """Image layers this server built and found already built (in the shared cache)."""
        cache = self._ctx.builder.cache
        return {"builds": cache.builds, "hits": cache.hits}

    @property
    def image_cache(self) -> Path:
        """Where built image layers are kept (shared by the local servers of this machine)."""
        return self._ctx.builder.cache.root

    @property
    def not_isolated_because(self) -> str | None:
        return self._ctx.not_isolated_because

    @property
    def limits_announcement(self) -> str:
        """What the server said at start about sandbox limits (`runtime.cgroups`)."""
        cg = self._ctx.cgroups
        return cg.announcement() if cg is not None else ""

    @property
    def limits_enforced(self) -> list[str]:
        """The sandbox limits this server enforces with cgroups: memory, cpu, pids."""
        cg = self._ctx.cgroups
        return cg.enforced if cg is not None else []

    @property
    def limits_not_enforced_because(self) -> str | None:
        """Why some sandbox limits are not enforced here (None: all are)."""
        cg = self._ctx.cgroups
        return cg.why_not if cg is not None else "the server has not started"

    @property
    def url(self) -> str:
        return (
            f"http://127.0.0.1:{self.port}" if self._host != "::1" else f"http://[::1]:{self.port}"
        )

    @property
    def tls_cert(self) -> Path:
        """The CA (one per state directory) that signs each tunnel's and the connect-token
        proxy's certificate: trusting it alone reaches them, e.g.
        ``ssl.create_default_context(cafile=lm.tls_cert)``."""
        return tls.ensure_ca(self.state_dir)

    @property
    def trust_bundle(self) -> Path:
        """``<state-dir>/tls/trust-bundle.pem``: this machine's CAs plus the server's, for
        ``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE`` of another process (`trust_env`)."""
        return tls.write_trust_bundle(self.state_dir)

    @property
    def trust_env(self) -> dict[str, str]:
        """The variables that make another process's Python HTTPS clients trust this
        server's tunnels and still every other site (``local serve`` prints them)."""
        bundle = str(self.trust_bundle)
        return {var: bundle for var in tls.TRUST_VARIABLES}

    @property
    def env(self) -> dict[str, str]:
        """The environment a child process needs to reach this server with the modal client."""
        return {
            "MODAL_SERVER_URL": self.url,
            "MODAL_TOKEN_ID": self.credentials.token_id,
            "MODAL_TOKEN_SECRET": self.credentials.token_secret,
        }

    @property
    def client(self) -> Any:
        """A `modal.Client` bound to this server (not the process-wide ``from_env`` singleton)."""
        if self._client is None:
            self._client = make_client(
                self.url, self.credentials.token_id, self.credentials.token_secret
            )
        return self._client

    def _call(self, coro_fn: Any) -> Any:
        loop = self._loop
        if loop is None or loop.is_closed() or self._stopped:
            raise RuntimeError("LocalModal is not running")

        async def runner() -> Any:
            return coro_fn()

        fut: Future[Any] = asyncio.run_coroutine_threadsafe(runner(), loop)
        return fut.result(30)

    def sandboxes(self) -> list[SandboxRecord]:
        """Every sandbox this server started, newest last; never secret values."""
        if self._stopped or self._loop is None or self._loop.is_closed():
            return self.registry.records()
        return list(self._call(self.registry.records))

    def define_secret(self, name: str, values: dict[str, str]) -> None:
        """Make ``modal.Secret.from_name(name)`` resolve to ``values`` on this server."""
        if self._loop is None or self._stopped:
            self.registry.define_secret(name, values)
        else:
            self._call(lambda: self.registry.define_secret(name, values))


def make_client(server_url: str, token_id: str, token_secret: str) -> Any:
    """A `modal.Client` for ``server_url``, opened, without touching os.environ."""
    import modal
    from modal._utils.async_utils import synchronizer
    from modal.client import _Client
    from modal_proto import api_pb2

    async def _open() -> _Client:
        c = _Client(server_url, api_pb2.CLIENT_TYPE_CLIENT, (token_id, token_secret))
        await c._open()
        return c

    raw = synchronizer.create_blocking(_open)()
    if isinstance(raw, modal.Client):
        return raw
    return synchronizer._translate_out(raw)
