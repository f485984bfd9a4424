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

Nothing here imports `modal`: sandboxes go through `core.modal_api`.  A call is known
only by the `WarmCall` protocol (what the sandbox's readers hand it).
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextvars import copy_context
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from prefect_modal.core import modal_api
from prefect_modal.core.errors import PrefectModalError
from prefect_modal.core.spec import SandboxSpec
from prefect_modal.task_runner import remote

if TYPE_CHECKING:
    from prefect_modal.task_runner.warm_records import WarmRecord


class WarmCall(Protocol):
    """The call a warm sandbox serves (`call.WarmCall`): its readers hand it what
    the sandbox sends while it runs."""

    def on_warm_frame(self, kind: str, body: bytes) -> None: ...

    def on_warm_line(self, line: str) -> None: ...

    def on_warm_exit(self, returncode: int | None) -> None: ...


class StartPlan(NamedTuple):
    """What a new warm sandbox needs: its spec, its command (the bootstrap, in its
    loop), the modal client, its name and tags, and how to make its record once it
    exists (`warm_records.WarmRecord`)."""

    spec: SandboxSpec
    command: list[str]
    client: Any
    name: str
    tags: dict[str, str]
    make_record: Callable[[WarmSandbox], WarmRecord | None]


Starter = Callable[[], StartPlan]

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

#: A start running longer than this many times the pool's median start (and at
#: least `SLOW_START_MIN_S`) gets one spare start while calls wait: Modal's start
#: time has a long tail (median 2.66 s, p99 22.39 s on ComputeSDK's leaderboard).
SLOW_START_FACTOR = 3.0
SLOW_START_MIN_S = 5.0
#: Starts of a spec that must have finished before one counts as slow.
SLOW_START_SAMPLES = 3

#: How long a finished call waits for the last of its output lines.
_END_WAIT_SECONDS = 5.0


class WarmStartError(PrefectModalError, RuntimeError):
    """A warm sandbox ended before its bootstrap greeted: it never served a call."""

    def __init__(self, sandbox_id: str, returncode: int | None, tail: list[str]) -> None:
        self.sandbox_id, self.returncode, self.tail = sandbox_id, returncode, tail
        super().__init__(
            f"warm sandbox {sandbox_id} ended with exit code {returncode} before its "
            "bootstrap started"
        )


class PoolClosedError(PrefectModalError, RuntimeError):
    """The flow run's sandboxes were shut down (it ended or was cancelled) while a call
    waited for one."""


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
        self.created = time.monotonic()  # when its start began (`started`: when it was up)
        self.started = time.monotonic()
        self.idle_since = time.monotonic()
        self.returncode: int | None = None
        self.dead = threading.Event()
        #: its channel (stdout) has been read to the end
        self.channel_done = threading.Event()
        #: its stderr (the calls' output lines) has been read to the end
        self.stderr_done = threading.Event()
        self.retiring = False
        #: ended by us (a cancel, a timeout, the flow run's end), not by itself
        self.terminated = False
        #: its record (one artifact per warm sandbox), made once it exists
        self.record: WarmRecord | None = None
        #: its end is recorded (the runner's table waits for this)
        self.finalized = threading.Event()
        #: its bootstrap greeted (HELLO on the channel): it can take a call.  On Modal
        #: `create()` returns once the sandbox is scheduled; its container starts after.
        self.ready = threading.Event()
        #: output lines seen while no call ran (why a start failed)
        self._idle_tail: list[str] = []
        self._lock = threading.Lock()
        self._stdin_lock = threading.Lock()
        self._current: WarmCall | None = None
        self._last_write = time.monotonic()

    # -- start -------------------------------------------------------------------

    def start(self, plan: StartPlan) -> None:
        client, name, tags = plan.client, plan.name, plan.tags
        spec = self.spec
        if spec.idle_timeout is None:
            backstop = int(self.pool.idle_seconds) + BACKSTOP_GRACE_SECONDS
            spec = spec.merged_with(SandboxSpec(idle_timeout=backstop))
        self.name = name
        app, image = modal_api.prepare(spec, client)
        self.sandbox = modal_api.create_sandbox(
            spec, plan.command, client=client, name=name, tags=tags, app=app, image=image
        )
        self.sandbox_id = modal_api.sandbox_id(self.sandbox)
        self.started = time.monotonic()
        # Its record is made before its exit can be seen.  One that comes up after its
        # flow run ended is terminated at once, served no call, and is not recorded.
        if not self.pool.closed:
            self.record = plan.make_record(self)
        greeting = remote.LOOP_GREETING + f"nonce={self.session}\n".encode()
        self._write(greeting)
        for target, label in (
            (self._follow_channel, "channel"),
            (self._follow_stderr, "stderr"),
            (self._wait_exit, "exit"),
        ):
            # In a copy of this thread's context: the calls' output lines are logged from
            # these threads, and Prefect's settings (which API gets them) live there.
            threading.Thread(
                target=copy_context().run,
                args=(target,),
                name=f"prefect-modal-warm-{label}",
                daemon=True,
            ).start()
        # Up is when the bootstrap greets, not when create returns: a call leased before
        # would wait out the container's start (Modal's tail: p99 22 s) on this sandbox.
        while not self.ready.wait(0.25):
            if self.dead.is_set():
                self.stderr_done.wait(_END_WAIT_SECONDS)
                raise WarmStartError(self.sandbox_id, self.returncode, list(self._idle_tail))
            if self.pool.closed:  # the flow run ended while it started: `_run_start` ends it
                raise PoolClosedError("the flow run's sandboxes were shut down")

    # -- a call --------------------------------------------------------------------

    def begin(self, call: WarmCall) -> int:
        """Make `call` the running call; its number in this sandbox (1 for the first)."""
        with self._lock:
            self._current = call
            self.calls_served += 1
            return self.calls_served

    def end(self, call: WarmCall) -> None:
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
            modal_api.send_stdin(self.sandbox, data, eof=False)
            self._last_write = time.monotonic()

    def finish(self, wait: float) -> None:
        """End an idle sandbox the normal way (stdin closed: the bootstrap exits 0);
        terminate it if it has not gone within `wait` seconds."""
        self.retiring = True
        try:
            with self._stdin_lock:
                modal_api.send_stdin(self.sandbox, b"", eof=True)
        except Exception:
            pass
        if not self.dead.wait(wait):
            self.terminate()

    def terminate(self) -> None:
        self.retiring = True
        self.terminated = True
        logger.debug("prefect-modal: terminating warm sandbox %s", self.sandbox_id or "(starting)")
        try:
            modal_api.terminate(self.sandbox)
        except Exception as exc:
            logger.debug("prefect-modal: terminating warm sandbox %s: %s", self.sandbox_id, exc)

    def usable(self) -> bool:
        if self.dead.is_set() or self.retiring:
            return False
        lifetime = self.spec.timeout
        return not lifetime or time.monotonic() - self.started < lifetime * MAX_AGE_SHARE

    # -- readers -------------------------------------------------------------------

    def _current_call(self) -> WarmCall | None:
        with self._lock:
            return self._current

    def _read_to_end(
        self,
        follow: Callable[[Any, Callable[[str], None]], None],
        on_text: Callable[[str], None],
        done: threading.Event,
        what: str,
    ) -> None:
        """Follow one of the sandbox's streams to its end, then say so with `done`."""
        try:
            follow(self.sandbox, on_text)
        except Exception as exc:
            logger.debug("prefect-modal: warm %s of %s ended: %s", what, self.sandbox_id, exc)
        finally:
            done.set()

    def _follow_channel(self) -> None:
        reader = remote.FrameReader(self.session)

        def on_chunk(chunk: str) -> None:
            for kind, body in reader.feed(chunk):
                if kind == "HELLO":
                    self.ready.set()
                    continue
                call = self._current_call()
                if call is not None:
                    call.on_warm_frame(kind, body)

        self._read_to_end(modal_api.follow_stdout, on_chunk, self.channel_done, "channel")

    def _follow_stderr(self) -> None:
        def on_line(line: str) -> None:
            call = self._current_call()
            if call is not None:
                call.on_warm_line(line)
            else:
                logger.debug("prefect-modal: %s (idle): %s", self.sandbox_id, line)
                self._idle_tail = [*self._idle_tail[-19:], line]

        self._read_to_end(modal_api.follow_stderr, on_line, self.stderr_done, "stderr")

    def _wait_exit(self) -> None:
        try:
            self.returncode = modal_api.wait_returncode(self.sandbox)
        except Exception as exc:
            logger.debug("prefect-modal: waiting for %s: %s", self.sandbox_id, exc)
        self.dead.set()
        call = self._current_call()
        if call is not None:
            call.on_warm_exit(self.returncode)
        try:
            if self.record is not None:  # recorded before the pool forgets it (see `close`)
                self.record.sandbox_ended(self.returncode, self.terminated)
        except Exception as exc:
            logger.warning("prefect-modal: recording the end of %s: %s", self.sandbox_id, exc)
        finally:
            self.finalized.set()
        self.pool._on_dead(self)
        # Its exit is reported before its output is read to the end (the bootstrap writes
        # a call's last frame, then exits at once: a Python mismatch's ERROR frame, say).
        # Detaching closes the connection the readers stream on, and a reader between two
        # reads of it then ends with the frame unread: detach only once both have ended.
        deadline = time.monotonic() + _END_WAIT_SECONDS
        for done in (self.channel_done, self.stderr_done):
            done.wait(max(0.0, deadline - time.monotonic()))
        try:
            modal_api.detach(self.sandbox)
        except Exception:
            pass


class WarmPool:
    """The warm sandboxes of one runner instance (one flow run), keyed by effective spec.

    Starts run ahead of the calls, in the pool's own threads: a call that finds
    no idle sandbox of its spec registers as waiting, and the pool starts
    sandboxes (up to the free slots) until the starts in flight cover the
    waiting calls.  A call takes whichever sandbox of its spec is idle first,
    not the one started for it, so a slow start (Modal's p99 is ~8x its
    median) delays no call while another sandbox is free; and a start that
    takes far longer than this pool's median start gets a spare one.
    """

    def __init__(self, slots: threading.BoundedSemaphore, idle_seconds: float) -> None:
        self.slots = slots
        self.idle_seconds = idle_seconds
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        #: calls waiting in `lease`, one condition per key on the pool's lock: an idle
        #: sandbox wakes one waiter of its key, not every waiting thread of the map
        self._key_conds: dict[str, threading.Condition] = {}
        self._idle: list[WarmSandbox] = []
        self._all: set[WarmSandbox] = set()
        self._closed = False
        self._reaper: threading.Thread | None = None
        #: per key: calls waiting for a sandbox, starts in flight, failed starts not yet
        #: reported to a call, and the durations of the starts that succeeded
        self._waiting: dict[str, int] = {}
        self._starting: dict[str, list[WarmSandbox]] = {}
        self._spared: set[WarmSandbox] = set()
        self._failures: dict[str, list[BaseException]] = {}
        self._durations: dict[str, list[float]] = {}
        self._start_threads: set[threading.Thread] = set()
        #: every sandbox this pool started (ids and calls served: tests and tables)
        self.started: list[WarmSandbox] = []

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    # -- slots -----------------------------------------------------------------------

    def acquire(self, key: str | None, timeout: float) -> bool:
        """A slot for a per-call sandbox (`key` None): True, or False after `timeout`.

        When no slot is free, an idle sandbox is retired to make one.  Warm calls
        use `lease` instead.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if self._closed:
                    raise PoolClosedError("the flow run's sandboxes were shut down")
            if self.slots.acquire(timeout=0):
                return True
            if self._retire_one(key):
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._cond:
                self._cond.wait(min(left, 0.05))

    def lease(self, key: str, timeout: float, starter: Starter) -> WarmSandbox | None:
        """An idle warm sandbox of `key` for one call, or None after `timeout`.

        While the call waits, starts run ahead for it (`starter` says how: spec,
        client, name and tags of a new sandbox).  A start that failed is raised
        here, in one waiting call, as it would have been in a call starting its
        own sandbox.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting[key] = self._waiting.get(key, 0) + 1
        counted = True
        try:
            while True:
                with self._cond:
                    if self._closed:
                        raise PoolClosedError("the flow run's sandboxes were shut down")
                    for warm in reversed(self._idle):
                        if warm.key == key and warm.usable():
                            # no longer waiting, in the same step as taking it: another
                            # waiter must not count this call and start one more
                            self._idle.remove(warm)
                            self._waiting[key] -= 1
                            counted = False
                            return warm
                    failures = self._failures.get(key)
                    if failures:
                        self._waiting[key] -= 1
                        counted = False
                        raise failures.pop(0)
                    starting = self._starting.get(key, [])
                    wanted = self._waiting[key] > len(starting) or self._slow_start(key)
                    if not wanted:  # wait under the same lock: no idle sandbox is missed
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return None
                        self._key_cond(key).wait(min(left, 0.25))
                        continue
                    if self.slots.acquire(timeout=0):
                        # counted as starting under the lock that saw it wanted, so two
                        # waiters never start two sandboxes for one call
                        self._start_ahead(key, starter)
                        continue
                if self._retire_one(key):
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                with self._cond:
                    self._key_cond(key).wait(min(left, 0.25))
        finally:
            if counted:
                with self._cond:
                    self._waiting[key] -= 1

    def _slow_start(self, key: str) -> bool:
        """A start of `key` in flight far beyond this pool's median (the tail): one spare
        start for it.  Called with the lock held."""
        done = self._durations.get(key, [])
        if len(done) < SLOW_START_SAMPLES:  # no median yet: a slow machine is not a slow start
            return False
        median = sorted(done)[len(done) // 2]
        limit = max(SLOW_START_MIN_S, SLOW_START_FACTOR * median)
        now = time.monotonic()
        for warm in self._starting.get(key, []):
            if warm not in self._spared and now - warm.created > limit:
                self._spared.add(warm)
                return True
        return False

    def _retire_one(self, key: str | None) -> bool:
        """Retire the longest-idle sandbox of another spec (or an unusable one) to free a
        slot; False if there is none."""
        with self._cond:
            others = [w for w in self._idle if w.key != key or not w.usable()]
            if not others:
                return False
            victim = min(others, key=lambda w: w.idle_since)
            self._idle.remove(victim)
        self._retire(victim)
        return True

    def release_slot(self) -> None:
        self.slots.release()
        with self._cond:
            self._cond.notify_all()
            for cond in self._key_conds.values():  # a waiter of each key may start one
                cond.notify()

    def _key_cond(self, key: str) -> threading.Condition:
        """Called with the lock held."""
        cond = self._key_conds.get(key)
        if cond is None:
            cond = self._key_conds[key] = threading.Condition(self._mutex)
        return cond

    # -- sandboxes -------------------------------------------------------------------

    def _start_ahead(self, key: str, starter: Starter) -> None:
        """Start a sandbox of `key` in the slot the caller holds, in a thread of its own.
        Called with the lock held (the pool is open).

        It is registered (in `_all`, so `close` sees it) before its create call
        goes out; a start that returns after the pool closed is terminated.
        """
        try:
            plan = starter()
        except BaseException:
            self.slots.release()
            raise
        warm = WarmSandbox(self, key, plan.spec)
        self._all.add(warm)
        self.started.append(warm)
        self._starting.setdefault(key, []).append(warm)
        # Not a daemon: a start still in flight when the flow run ends terminates what
        # its create returns, and the interpreter waits for that before it exits.
        thread = threading.Thread(
            target=copy_context().run,
            args=(self._run_start, warm, plan),
            name="prefect-modal-warm-start",
            daemon=False,
        )
        self._start_threads.add(thread)
        thread.start()

    def _run_start(self, warm: WarmSandbox, plan: StartPlan) -> None:
        key = warm.key
        try:
            warm.start(plan)
        except BaseException as exc:
            with self._cond:
                self._forget_start(warm)
                owned = warm in self._all  # its exit may have given the slot back already
                self._all.discard(warm)
                if self._waiting.get(key) and not self._closed:
                    self._failures.setdefault(key, []).append(exc)
                    self._key_cond(key).notify()
            if warm.sandbox is not None and not warm.dead.is_set():  # not ours to keep
                warm.terminate()
            if owned:
                self.release_slot()
            return
        with self._cond:
            self._forget_start(warm)
            self._durations.setdefault(key, []).append(time.monotonic() - warm.created)
            closed = self._closed
            if not closed and not warm.dead.is_set():
                warm.idle_since = time.monotonic()
                self._idle.append(warm)
            self._key_cond(key).notify()
        if closed:  # the flow run ended while it started: it must not outlive it
            warm.terminate()
        else:
            self._ensure_reaper()

    def _forget_start(self, warm: WarmSandbox) -> None:
        """Called with the lock held."""
        starting = self._starting.get(warm.key, [])
        if warm in starting:
            starting.remove(warm)
        self._spared.discard(warm)
        self._start_threads.discard(threading.current_thread())

    def give_back(self, warm: WarmSandbox, keep: bool) -> None:
        """A call is done with `warm`: idle for the next call, or retired.

        Once the pool is closed, `close` has ended every sandbox it had, this one
        included (terminated, unless it was idle at a graceful close); retiring it
        here too would close its stdin, and a bootstrap that reads that end before
        the termination lands exits 0: a cancelled run's sandbox recorded as exited.
        """
        with self._cond:
            if self._closed:
                return
            if keep and warm.usable():
                warm.idle_since = time.monotonic()
                self._idle.append(warm)
                self._key_cond(warm.key).notify()
                self._cond.notify_all()  # a per-call sandbox may retire it for its slot
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
                self._retire(warm)
            for warm in busy:
                warm.heartbeat()

    def alive(self) -> list[WarmSandbox]:
        with self._cond:
            return list(self._all)

    def close(self, wait: float = 0.0, graceful: bool = False) -> list[threading.Thread]:
        """End every sandbox of the pool; new calls are refused.  `graceful` (the flow
        run ended normally): idle sandboxes exit 0, busy ones are terminated; else
        (cancelled, crashed) every one is terminated at once.

        `wait` seconds at most for them to end and be recorded.  A start in flight
        ends what its create returns without waiting for the container (Modal's
        start has a long tail: p95 11.8 s), and its thread is no daemon: should
        `wait` run out, the process still waits for it at exit.  Returns the threads.
        """
        with self._cond:
            self._closed = True
            everything = list(self._all)
            idle = set(self._idle)
            self._idle.clear()
            # a start in flight terminates what its create returns (see `_run_start`)
            starts = list(self._start_threads)
            self._cond.notify_all()
            for cond in self._key_conds.values():
                cond.notify_all()
        threads = []
        for warm in everything:
            if warm.sandbox is None:
                continue
            end: Any = (
                functools.partial(warm.finish, 3.0) if graceful and warm in idle else warm.terminate
            )
            thread = threading.Thread(target=end, name="prefect-modal-close", daemon=True)
            thread.start()
            threads.append(thread)
        threads += starts
        if wait:
            deadline = time.monotonic() + wait
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            for warm in everything:  # their records are final before the run's table
                if warm.sandbox is not None and warm.record is not None:
                    warm.finalized.wait(max(0.0, deadline - time.monotonic()))
        return threads

    def served(self) -> dict[str, int]:
        """Calls per sandbox id, for the flow's table."""
        with self._cond:
            return {w.sandbox_id: w.calls_served for w in self.started if w.sandbox_id}
