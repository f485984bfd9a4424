"""`InterruptWatcher`: a SIGINT the main thread cannot take yet still ends the sandboxes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading

from prefect_modal.task_runner.interrupts import InterruptWatcher

# The main thread blocks SIGINT at the OS level, so the kernel hands it to another
# thread and the main thread's lock wait is not interrupted: the case where Python
# cannot run its handler until something releases the lock.  The watcher reacts
# (here: releases it, as ended sandboxes resolve a flow's futures); the main thread
# then raises KeyboardInterrupt as usual, and the wakeup descriptor set before the
# watcher's (asyncio's, an outer runner's) got its byte too.
SCRIPT = textwrap.dedent(
    """
    import os, signal, socket, threading
    from prefect_modal.interrupts import InterruptWatcher

    earlier_r, earlier_w = socket.socketpair()
    earlier_w.setblocking(False)
    signal.set_wakeup_fd(earlier_w.fileno())
    lock = threading.Lock()
    lock.acquire()
    fired = []

    def on_interrupt():
        fired.append(threading.current_thread().name)
        lock.release()

    watcher = InterruptWatcher(on_interrupt)
    assert watcher.start()
    sender = threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGINT))
    sender.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        lock.acquire()
        for _ in range(100000):
            pass
        print("no KeyboardInterrupt")
    except KeyboardInterrupt:
        print("KeyboardInterrupt after", fired)
    print("earlier descriptor got", list(earlier_r.recv(8)))
    watcher.stop()
    print("restored", signal.set_wakeup_fd(-1) == earlier_w.fileno())
    """
)


def test_sigint_reaches_the_watcher_while_the_main_thread_is_blocked() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        # a test run in the background may have SIGINT ignored; a terminal's is default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "KeyboardInterrupt after ['prefect-modal-sigint']", out.stdout
    assert lines[1] == f"earlier descriptor got [{int(signal.SIGINT)}]", out.stdout
    assert lines[2] == "restored True", out.stdout


def test_the_watcher_stays_out_of_a_programs_own_handling() -> None:
    calls: list[str] = []
    watcher = InterruptWatcher(lambda: calls.append("fired"))
    started: list[bool] = []
    thread = threading.Thread(target=lambda: started.append(watcher.start()))
    thread.start()
    thread.join()
    assert started == [False]  # not the main thread: set_wakeup_fd is not ours to set there

    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        assert watcher.start() is False  # the program handles Ctrl-C itself
    finally:
        signal.signal(signal.SIGINT, previous)
    watcher.stop()  # a watcher that never started stops quietly
    assert calls == []
