"""Ctrl-C ends a flow run's sandboxes at once, whatever the flow's main thread is doing.

Python runs signal handlers in the main thread only, between bytecodes.  A
flow waiting on its futures sits in a lock wait in that thread (Prefect's
`as_completed`).  The kernel may hand a process-wide signal to any thread;
one that does not interrupt that wait is handled only when the lock is
released: for a map of long tasks, when a task ends.  Measured with the
lifecycle test's flow under load: 2 Ctrl-Cs in 8 left the main thread in
that wait and four sandboxes running; with this watcher, 16 in 16 ended them.

`set_wakeup_fd` is the documented way around it: the C-level handler writes
the signal number to a file descriptor in whichever thread received the
signal, at once.  An `InterruptWatcher` reads that descriptor in a thread
of its own and, on SIGINT, ends the runner's sandboxes; their calls end,
their futures resolve, the main thread wakes and raises KeyboardInterrupt
as Python would have.  Bytes meant for a wakeup descriptor set before ours
(asyncio's, an outer runner's) are passed on to it, and it is put back when
the runner exits.

It is used only in the main thread and only while SIGINT has Python's
default handler: a program with its own Ctrl-C handling keeps it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

logger = logging.getLogger("prefect_modal.task_runner")


class InterruptWatcher:
    """Calls `on_interrupt` once, from its own thread, when the process gets SIGINT."""

    def __init__(self, on_interrupt: Callable[[], None]) -> None:
        self._on_interrupt = on_interrupt
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._previous = -1
        self._thread: threading.Thread | None = None
        self._fired = False

    def start(self) -> bool:
        """Watch for SIGINT; False (and nothing done) outside the main thread or when
        SIGINT has a handler of the program's own."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return False
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # set_wakeup_fd requires it
        try:
            self._previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError) as exc:
            logger.debug("prefect-modal: no SIGINT watcher (%s)", exc)
            reader.close()
            writer.close()
            return False
        self._reader, self._writer = reader, writer
        self._thread = threading.Thread(
            target=self._watch, name="prefect-modal-sigint", daemon=True
        )
        self._thread.start()
        return True

    def stop(self) -> None:
        """Put the previous wakeup descriptor back (if ours is still the one set) and end
        the watching thread.  Called from the thread that started it."""
        reader, writer = self._reader, self._writer
        if reader is None or writer is None:
            return
        self._reader = self._writer = None
        try:
            current = signal.set_wakeup_fd(self._previous, warn_on_full_buffer=False)
            if current != writer.fileno():  # someone set another since: leave theirs
                signal.set_wakeup_fd(current, warn_on_full_buffer=False)
        except (ValueError, OSError) as exc:
            logger.debug("prefect-modal: restoring the wakeup descriptor: %s", exc)
        try:
            reader.shutdown(socket.SHUT_RDWR)  # the thread's recv returns
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=2)
        reader.close()
        writer.close()

    def _watch(self) -> None:
        reader = self._reader
        assert reader is not None
        previous = self._previous
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if previous != -1:  # the descriptor we replaced gets its bytes as before
                try:
                    os.write(previous, data)
                except OSError:
                    pass
            if signal.SIGINT in data and not self._fired:
                self._fired = True
                try:
                    self._on_interrupt()
                except Exception as exc:
                    logger.warning("prefect-modal: ending sandboxes on Ctrl-C: %s", exc)


__all__ = ["InterruptWatcher"]
