"""The registry that ends a flow run's sandboxes: task calls, warm pools, sessions.

Prefect cancels a flow run by calling ``cancel_all()`` on the flow's *template*
task runner, while the calls were started by its duplicates; a sandbox
session opened in the run must end with it too.  So everything that holds a
sandbox registers in one `CallRegistry` per runner *family* (a runner, its
duplicates and copies in this process), found by `registry_for`.  The
registry knows its members only by two small protocols (`Cancellable`,
`Closable`), so it depends on no mode, and every mode can use it.
"""

from __future__ import annotations

import atexit
import threading
from typing import Protocol, runtime_checkable


class Cancellable(Protocol):
    """What a registry holds: a task call, or a sandbox session."""

    owner: object

    def cancel(self, reason: str) -> threading.Thread | None: ...


class Closable(Protocol):
    """A group of sandboxes that ends together (a flow run's warm pool)."""

    def close(self) -> list[threading.Thread]: ...


@runtime_checkable
class HasCancellation(Protocol):
    """A task runner whose cancellation also ends what registers with it (`ModalTaskRunner`)."""

    @property
    def cancellation(self) -> CallRegistry: ...


class CallRegistry:
    """The calls, pools and sessions in flight for one runner family in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: set[Cancellable] = set()
        self._pools: dict[int, tuple[object, Closable]] = {}

    def add_pool(self, owner: object, pool: Closable) -> None:
        with self._lock:
            self._pools[id(pool)] = (owner, pool)

    def discard_pool(self, pool: Closable) -> None:
        with self._lock:
            self._pools.pop(id(pool), None)

    def add(self, call: Cancellable) -> None:
        with self._lock:
            self._calls.add(call)

    def discard(self, call: Cancellable) -> None:
        with self._lock:
            self._calls.discard(call)

    def active(self, owner: object | None = None) -> list[Cancellable]:
        with self._lock:
            return [c for c in self._calls if owner is None or c.owner is owner]

    def cancel_all(self, reason: str, owner: object | None = None) -> list[threading.Thread]:
        """Terminate every in-flight sandbox (of `owner`, or all) and every warm one;
        returns at once."""
        threads = [t for c in self.active(owner) if (t := c.cancel(reason)) is not None]
        with self._lock:
            pools = [p for o, p in self._pools.values() if owner is None or o is owner]
        for pool in pools:
            threads += pool.close()
        return threads


_registries: dict[str, CallRegistry] = {}
_registries_lock = threading.Lock()


def registry_for(family: str) -> CallRegistry:
    """The registry of a runner family (made on first use)."""
    with _registries_lock:
        return _registries.setdefault(family, CallRegistry())


def _terminate_everything_left() -> None:
    """At interpreter exit (Ctrl-C of the flow process), leave no sandbox running."""
    threads = []
    for registry in list(_registries.values()):
        threads += registry.cancel_all("the flow process is exiting")
    for t in threads:
        t.join(timeout=5)


atexit.register(_terminate_everything_left)
