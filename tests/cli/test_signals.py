"""Clean stops: a signalled `prefect-modal demo --keep` or `local serve` leaves no process.

The services the demo starts run in their own sessions, so a closed terminal
(SIGHUP) or `kill` (SIGTERM) reaches only the demo itself: it must stop them.
Every process it started is collected by pid (with its start time) while it
runs, and checked gone after it exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import modal
import pytest
from process_tree import Proc, alive, children, descendants, describe

from prefect_modal.cli import services
from prefect_modal.local import make_client

CLI = str(Path(sys.executable).parent / "prefect-modal")
ROOT = Path(__file__).resolve().parents[2]


def _watch_until(proc: subprocess.Popen[str], log: Path, marker: str, timeout: float) -> set[Proc]:
    """Collect `proc`'s descendants until `marker` is in its output; return them all."""
    seen: set[Proc] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen |= descendants(proc.pid)
        text = log.read_text(errors="replace")
        if marker in text:
            return seen | descendants(proc.pid)
        if proc.poll() is not None:
            pytest.fail(f"the demo exited ({proc.returncode}) before {marker!r}:\n{text[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"no {marker!r} within {timeout:.0f}s:\n{log.read_text(errors='replace')[-3000:]}")


def _assert_all_gone(procs: set[Proc], what: str, grace: float = 10) -> None:
    deadline = time.monotonic() + grace
    left = {p for p in procs if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = {p for p in left if alive(p)}
    assert not left, f"{what} left processes running:\n" + "\n".join(describe(left))


def _demo(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    env = services.isolated_env(tmp_path / "home")
    log = tmp_path / "demo.log"
    proc = subprocess.Popen(
        [CLI, "demo", "--keep"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # as under a terminal: the demo leads its own group
    )
    return proc, log


@pytest.mark.slow
def test_demo_keep_stops_everything_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM during `--keep`'s wait: Prefect server, local Modal server, fork server,
    worker, all stopped; the demo exits 128+15."""
    proc, log = _demo(tmp_path)
    try:
        started = _watch_until(proc, log, "services stay up", timeout=420)
        names = "\n".join(describe(started))
        assert "prefect_modal.local" in names and "worker" in names and "server" in names
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 128 + signal.SIGTERM, log.read_text()[-2000:]
        assert "Stopped by SIGTERM" in log.read_text()
        _assert_all_gone(started, "demo --keep after SIGTERM")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_demo_killed_by_sigkill_leaves_no_process(tmp_path: Path) -> None:
    """SIGKILL during `--keep`'s wait: no ``finally`` or ``atexit`` of the demo runs, yet
    every process it started (its services, and what they started: the local Modal
    server's fork server) is gone within seconds: the kernel's parent-death signal."""
    proc, log = _demo(tmp_path)
    started: set[Proc] = set()
    try:
        started = _watch_until(proc, log, "services stay up", timeout=420)
        names = "\n".join(describe(started))
        assert "prefect_modal.local" in names and "worker" in names and "server" in names
        assert started - children(proc.pid), "no grandchild to check:\n" + names
        proc.kill()  # the demo's pid only: its services lead groups of their own
        assert proc.wait(30) == -signal.SIGKILL
        _assert_all_gone(started, "demo --keep after SIGKILL", grace=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid, _ in sorted(p for p in started if alive(p)):  # left by a failure: by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_demo_stops_everything_on_sighup_while_runs_are_in_flight(tmp_path: Path) -> None:
    """SIGHUP (a closed terminal) while the worker runs a deployment: all stopped too."""
    proc, log = _demo(tmp_path)
    try:
        started = _watch_until(proc, log, "Worker for pool", timeout=420)
        time.sleep(1.0)  # a deployment run is now submitted to the worker
        started |= descendants(proc.pid)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(90) == 128 + signal.SIGHUP, log.read_text()[-2000:]
        _assert_all_gone(started, "demo --keep after SIGHUP")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_local_serve_stops_its_sandboxes_and_fork_server(tmp_path: Path, sig: int) -> None:
    service = services.start_local_modal(tmp_path / "state")
    try:
        client = make_client(
            service.env["MODAL_SERVER_URL"],
            service.env["MODAL_TOKEN_ID"],
            service.env["MODAL_TOKEN_SECRET"],
        )
        app = modal.App.lookup("signals", create_if_missing=True, client=client)
        forked = modal.Sandbox.create(
            "python", "-c", "print('up', flush=True); import time; time.sleep(600)",
            app=app, client=client,
        )  # fmt: skip
        fresh = modal.Sandbox.create("sh", "-c", "echo up; sleep 600", app=app, client=client)
        assert next(iter(forked.stdout)) == "up\n" and next(iter(fresh.stdout)) == "up\n"
        started = descendants(service.pid)
        assert len(started) >= 2, describe(started)
        service.process.send_signal(sig)
        assert service.process.wait(20) == 0, service.log_tail()
        _assert_all_gone(started, f"local serve after {signal.Signals(sig).name}")
    finally:
        service.stop()


def test_a_stop_signal_raises_in_the_main_thread_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(services.Stopped) as stopped, services.stop_on_signals():
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)  # interrupted at once by the handler
    assert stopped.value.signum == signal.SIGHUP and stopped.value.exit_code == 129
    assert isinstance(stopped.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before
