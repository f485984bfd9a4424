"""Retention: a long-running local server forgets finished sandboxes.

Modal forgets a finished sandbox after a while too; here it is what keeps
``prefect-modal local serve`` flat over days: every finished sandbox costs its
record and output buffers in memory and its root directory and output files
on disk. `Pruner` wakes every few seconds (a quarter of the retention, at most
30 s) and, for each sandbox that finished at least ``retention_s`` ago, drops
it from the registry (a later lookup answers NOT_FOUND saying it was pruned)
and removes ``<state_dir>/sandboxes/<id>``. In a sandbox that is still running,
execs that finished that long ago go the same way. A running sandbox is never
touched.

Directories are removed in a worker thread: a root may hold many files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import stat
import time
from pathlib import Path

from .runtime import safe_files, userns
from .state import Registry

log = logging.getLogger("prefect_modal.local")

MAX_INTERVAL_S = 30.0
MIN_INTERVAL_S = 0.05


def check_retention(retention_s: float | None) -> float | None:
    """Validate a retention setting: seconds > 0, or None / 0 for "keep until the server stops"."""
    if retention_s is None or (retention_s == 0 and not isinstance(retention_s, bool)):
        return None
    ok = isinstance(retention_s, (int, float)) and not isinstance(retention_s, bool)
    if not ok or not 0 < retention_s < float("inf"):
        raise ValueError(
            f"retention_s={retention_s!r}: expected seconds (a finite number > 0), "
            "or 0 / None to keep finished sandboxes until the server stops"
        )
    return float(retention_s)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if not path.exists():
        return
    # a sandbox may leave directories it made unwritable: open them up (by descriptor,
    # never through a symlink), then again
    with contextlib.suppress(OSError):
        safe_files.open_up_tree(path, stat.S_IRWXU)
    if userns.remove_inside(path):  # a normal user's sandbox gave files to subordinate ids
        return
    shutil.rmtree(path)


def remove_paths(paths: list[Path]) -> None:
    """Remove directories and files (symlinks are removed, never followed)."""
    for path in paths:
        try:
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc.strerror)


class Pruner:
    """Forgets finished sandboxes (and finished execs) after the registry's retention."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._task: asyncio.Task[None] | None = None

    @property
    def interval_s(self) -> float:
        retention = self.registry.retention_s or MAX_INTERVAL_S
        return min(max(retention / 4, MIN_INTERVAL_S), MAX_INTERVAL_S)

    def start(self) -> None:
        """Run in the background on the current loop (nothing to do without a retention)."""
        if self.registry.retention_s and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.prune()
            except Exception as exc:  # a failed round must not end pruning, nor the server
                log.warning("pruning finished sandboxes failed: %s", exc)

    async def prune(self) -> list[str]:
        """One round: forget what finished ``retention_s`` ago; the ids of pruned sandboxes."""
        reg = self.registry
        retention = reg.retention_s
        if not retention:
            return []
        wall_cutoff = time.time() - retention
        mono_cutoff = time.monotonic() - retention
        pruned: list[str] = []
        doomed: list[Path] = []
        for sb in list(reg.sandboxes.values()):
            if not sb.done.is_set():
                for exec_id, ex in list(sb.execs.items()):
                    finished = ex.finished_at
                    if (
                        finished is not None
                        and finished <= mono_cutoff
                        and ex.stdout.closed
                        and ex.stderr.closed
                    ):
                        del sb.execs[exec_id]
                        ex.stdout.discard()
                        ex.stderr.discard()
                        doomed += [p for p in (ex.stdout.path, ex.stderr.path) if p is not None]
                continue
            if sb.finished_at is not None and sb.finished_at <= wall_cutoff:
                reg.remove_sandbox(sb)
                pruned.append(sb.id)
                doomed.append(sb.paths.root)
        if doomed:
            await asyncio.to_thread(remove_paths, doomed)
        if pruned:
            log.debug("pruned %d finished sandboxes", len(pruned))
        return pruned
