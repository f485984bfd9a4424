"""Warm sandboxes: one flow run's per-step calls share sandboxes whose settings are equal.

A sandbox start is a container start (seconds on Modal, a Python start
locally); a map of small tasks pays it on every call.  So a `WarmPool` keeps
sandboxes that finished a call alive, idle, for the next call with the same
effective `SandboxSpec`: the bootstrap (`remote.py`, warm mode) serves calls
one at a time over the channel it already has.  The pool bounds the
sandboxes alive (warm or per-call) by the runner's `max_parallelism`: a call
that needs a sandbox of another spec when none is free retires an idle one.

What ends a warm sandbox: a call that timed out, was cancelled or crashed it
(the call terminates it, as without reuse); being idle longer than the
runner's `idle_seconds`; the end of its flow run (`close()`, from the
runner's `__exit__` or `cancel_all`); and, should the flow process die, the
sandbox's own `idle_timeout` (the pool writes a heartbeat on stdin while a
call runs, so only a sandbox nobody drives reaches it).

Nothing here imports `modal`: sandboxes go through `prefect_modal.sandboxes`.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

from prefect_modal import remote, sandboxes
from prefect_modal.settings import SandboxSpec

if TYPE_CHECKING:
    from prefect_modal.sandbox_call import SandboxCall

logger = logging.getLogger("prefect_modal.task_runner")

#: Seconds an idle warm sandbox waits for another call before it is terminated.
#: Modal keeps an idle Function container about a minute by default; a flow's
#: next wave of tasks usually comes sooner.
DEFAULT_IDLE_SECONDS = 60.0

#: Added to `idle_seconds` for the sandbox's own `idle_timeout` (the backstop when
#: the flow process is gone and nothing terminates the sandbox).
BACKSTOP_GRACE_SECONDS = 60

#: A warm sandbox older than this share of its lifetime (`timeout`) takes no new
#: call: a call must not meet the sandbox's end half-way.
MAX_AGE_SHARE = 0.5

#: How long a finished call waits for the last of its output lines.
_END_WAIT_SECONDS = 5.0


def pool_key(spec: SandboxSpec) -> str:
    """Calls share sandboxes only when every setting is equal (secrets by name)."""
    return spec.model_dump_json()


class WarmSandbox:
    """One warm sandbox: its output readers, and the call it is running now (if any)."""

    def __init__(self, pool: WarmPool, key: str, spec: SandboxSpec) -> None:
        self.pool = pool
        self.key = key
        self.spec = spec
        self.session = secrets.token_hex(16)
        self.sandbox: Any = None
        self.sandbox_id = ""
        self.name = ""
        self.calls_served = 0
        self.started = time.monotonic()
        self.idle_since = time.monotonic()
        self.returncode: int | None = None
        self.dead = threading.Event()
        self.retiring = False
        self._lock = threading.Lock()
        self._stdin_lock = threading.Lock()
        self._current: SandboxCall | None = None
        self._last_write = time.monotonic()

    # -- start -------------------------------------------------------------------

    def start(self, client: Any, name: str, tags: dict[str, str]) -> None:
        spec = self.spec
        if spec.idle_timeout is None:
            backstop = int(self.pool.idle_seconds) + BACKSTOP_GRACE_SECONDS
            spec = spec.merged_with(SandboxSpec(idle_timeout=backstop))
        from prefect_modal.sandbox_call import bootstrap_command

        self.name = name
        app, image = sandboxes.prepare(spec, client)
        self.sandbox = sandboxes.create_sandbox(
            spec, bootstrap_command(), client=client, name=name, tags=tags, app=app, image=image
        )
        self.sandbox_id = sandboxes.sandbox_id(self.sandbox)
        self.started = time.monotonic()
        greeting = remote.LOOP_GREETING + f"nonce={self.session}\n".encode()
        self._write(greeting)
        for target, label in (
            (self._follow_channel, "channel"),
            (self._follow_stderr, "stderr"),
            (self._wait_exit, "exit"),
        ):
            threading.Thread(target=target, name=f"prefect-modal-warm-{label}", daemon=True).start()

    # -- a call --------------------------------------------------------------------

    def begin(self, call: SandboxCall) -> int:
        """Make `call` the running call; its number in this sandbox (1 for the first)."""
        with self._lock:
            self._current = call
            self.calls_served += 1
            return self.calls_served

    def end(self, call: SandboxCall) -> None:
        with self._lock:
            if self._current is call:
                self._current = None
            self.idle_since = time.monotonic()

    def send_call(self, data: bytes) -> None:
        self._write(remote.encode_frame(self.session, "CALL", data).encode("ascii"))

    def send_reply(self, data: bytes) -> None:
        self._write(remote.encode_frame(self.session, "REPLY", data).encode("ascii"))

    def heartbeat(self) -> None:
        """Keep a busy sandbox from its idle timeout (stdin activity counts)."""
        if time.monotonic() - self._last_write > 10:
            try:
                self._write(remote.encode_frame(self.session, "PING", b"").encode("ascii"))
            except Exception:
                pass

    def _write(self, data: bytes) -> None:
        with self._stdin_lock:
            sandboxes.send_stdin(self.sandbox, data, eof=False)
            self._last_write = time.monotonic()

    def finish(self, wait: float) -> None:
        """End an idle sandbox the normal way (stdin closed: the bootstrap exits 0);
        terminate it if it has not gone within `wait` seconds."""
        self.retiring = True
        try:
            with self._stdin_lock:
                sandboxes.send_stdin(self.sandbox, b"", eof=True)
        except Exception:
            pass
        if not self.dead.wait(wait):
            self.terminate()

    def terminate(self) -> None:
        self.retiring = True
        try:
            sandboxes.terminate(self.sandbox)
        except Exception as exc:
            logger.debug("prefect-modal: terminating warm sandbox %s: %s", self.sandbox_id, exc)

    def usable(self) -> bool:
        if self.dead.is_set() or self.retiring:
            return False
        lifetime = self.spec.timeout
        return not lifetime or time.monotonic() - self.started < lifetime * MAX_AGE_SHARE

    # -- readers -------------------------------------------------------------------

    def _current_call(self) -> SandboxCall | None:
        with self._lock:
            return self._current

    def _follow_channel(self) -> None:
        reader = remote.FrameReader(self.session)

        def on_chunk(chunk: str) -> None:
            for kind, body in reader.feed(chunk):
                call = self._current_call()
                if call is not None and kind != "HELLO":
                    call.on_warm_frame(kind, body)

        try:
            sandboxes.follow_stdout(self.sandbox, on_chunk)
        except Exception as exc:
            logger.debug("prefect-modal: warm channel of %s ended: %s", self.sandbox_id, exc)

    def _follow_stderr(self) -> None:
        def on_line(line: str) -> None:
            call = self._current_call()
            if call is not None:
                call.on_warm_line(line)
            else:
                logger.debug("prefect-modal: %s (idle): %s", self.sandbox_id, line)

        try:
            sandboxes.follow_stderr(self.sandbox, on_line)
        except Exception as exc:
            logger.debug("prefect-modal: warm stderr of %s ended: %s", self.sandbox_id, exc)

    def _wait_exit(self) -> None:
        try:
            self.returncode = sandboxes.wait_returncode(self.sandbox)
        except Exception as exc:
            logger.debug("prefect-modal: waiting for %s: %s", self.sandbox_id, exc)
        self.dead.set()
        call = self._current_call()
        if call is not None:
            call.on_warm_exit(self.returncode)
        self.pool._on_dead(self)
        try:
            sandboxes.detach(self.sandbox)
        except Exception:
            pass


class WarmPool:
    """The warm sandboxes of one runner instance (one flow run), keyed by effective spec."""

    def __init__(self, slots: threading.BoundedSemaphore, idle_seconds: float) -> None:
        self.slots = slots
        self.idle_seconds = idle_seconds
        self._cond = threading.Condition()
        self._idle: list[WarmSandbox] = []
        self._all: set[WarmSandbox] = set()
        self._closed = False
        self._reaper: threading.Thread | None = None
        #: every sandbox this pool started: (sandbox id, calls served), for tests and tables
        self.started: list[WarmSandbox] = []

    # -- slots -----------------------------------------------------------------------

    def acquire(self, key: str | None, timeout: float) -> WarmSandbox | bool:
        """An idle warm sandbox for `key`, or True: a slot to start a sandbox (or run a
        per-call one when `key` is None), or False after `timeout` without either.

        When no slot is free, an idle sandbox of another spec is retired to make one.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if self._closed:
                    raise RuntimeError("the flow run's sandboxes were shut down")
                if key is not None:
                    for warm in reversed(self._idle):
                        if warm.key == key and warm.usable():
                            self._idle.remove(warm)
                            return warm
            if self.slots.acquire(timeout=0):
                return True
            victim = None
            with self._cond:
                others = [w for w in self._idle if w.key != key or not w.usable()]
                if others:
                    victim = min(others, key=lambda w: w.idle_since)
                    self._idle.remove(victim)
            if victim is not None:
                self._retire(victim)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._cond:
                self._cond.wait(min(left, 0.05))

    def release_slot(self) -> None:
        self.slots.release()
        with self._cond:
            self._cond.notify_all()

    # -- sandboxes -------------------------------------------------------------------

    def start(
        self, key: str, spec: SandboxSpec, client: Any, name: str, tags: dict[str, str]
    ) -> WarmSandbox:
        """Start a warm sandbox in the slot the caller holds (freed again on failure)."""
        warm = WarmSandbox(self, key, spec)
        with self._cond:
            closed = self._closed
            if not closed:
                self._all.add(warm)
                self.started.append(warm)
        if closed:
            self.release_slot()
            raise RuntimeError("the flow run's sandboxes were shut down")
        try:
            warm.start(client, name, tags)
        except BaseException:
            with self._cond:
                self._all.discard(warm)
            self.release_slot()
            raise
        with self._cond:
            closed = self._closed
        if closed:
            warm.terminate()
        self._ensure_reaper()
        return warm

    def give_back(self, warm: WarmSandbox, keep: bool) -> None:
        """A call is done with `warm`: idle for the next call, or terminated."""
        if keep and warm.usable():
            with self._cond:
                if not self._closed and not warm.dead.is_set():
                    warm.idle_since = time.monotonic()
                    self._idle.append(warm)
                    self._cond.notify_all()
                    return
        self._retire(warm)

    def _retire(self, warm: WarmSandbox) -> None:
        if not warm.dead.is_set():
            threading.Thread(
                target=warm.finish, args=(3.0,), name="prefect-modal-retire", daemon=True
            ).start()

    def _on_dead(self, warm: WarmSandbox) -> None:
        with self._cond:
            if warm not in self._all:
                return
            self._all.discard(warm)
            if warm in self._idle:
                self._idle.remove(warm)
        self.release_slot()

    def _ensure_reaper(self) -> None:
        with self._cond:
            if self._reaper is not None or self._closed:
                return
            self._reaper = threading.Thread(
                target=self._reap, name="prefect-modal-warm-reaper", daemon=True
            )
            self._reaper.start()

    def _reap(self) -> None:
        """End sandboxes idle too long; keep busy ones from their idle timeout."""
        while True:
            with self._cond:
                if self._closed:
                    return
                self._cond.wait(1.0)
                now = time.monotonic()
                expired = [w for w in self._idle if now - w.idle_since > self.idle_seconds]
                for warm in expired:
                    self._idle.remove(warm)
                busy = [w for w in self._all if w not in self._idle]
            for warm in expired:  # idle too long: ends as at the end of the flow run
                threading.Thread(
                    target=warm.finish, args=(3.0,), name="prefect-modal-idle", daemon=True
                ).start()
            for warm in busy:
                warm.heartbeat()

    def alive(self) -> list[WarmSandbox]:
        with self._cond:
            return list(self._all)

    def close(self, wait: float = 0.0, graceful: bool = False) -> list[threading.Thread]:
        """End every sandbox of the pool; new calls are refused.  `graceful` (the flow
        run ended normally): idle sandboxes exit 0, busy ones are terminated; else
        (cancelled, crashed) every one is terminated at once."""
        with self._cond:
            self._closed = True
            everything = list(self._all)
            idle = set(self._idle)
            self._idle.clear()
            self._cond.notify_all()
        threads = []
        for warm in everything:
            end: Any = (
                functools.partial(warm.finish, 3.0) if graceful and warm in idle else warm.terminate
            )
            thread = threading.Thread(target=end, name="prefect-modal-close", daemon=True)
            thread.start()
            threads.append(thread)
        if wait:
            deadline = time.monotonic() + wait
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        return threads

    def served(self) -> dict[str, int]:
        """Calls per sandbox id, for the flow's table."""
        with self._cond:
            return {w.sandbox_id: w.calls_served for w in self.started if w.sandbox_id}
