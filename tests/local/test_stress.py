"""Volume, concurrency and process-tree guarantees of the local server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

import modal
import pytest
from sandbox_pids import host_pids

from prefect_modal.local import LocalModal
from prefect_modal.local.limits import DEFAULT_OUTPUT_WINDOW
from prefect_modal.local.runtime.processes import pid_alive

pytestmark = pytest.mark.slow

# 100 MiB of lines of ~64 KiB whose characters are 1 to 4 bytes long, written in
# odd-sized pieces, so multibyte characters straddle every kind of chunk boundary.
BIG_OUTPUT = r"""
import sys
unit = "aé€😀".encode()
line = unit * 6553 + b"\n"
total = 100 * 1024 * 1024
out = sys.stdout.buffer
blob = line * (total // len(line) + 1)
blob = blob[: total - total % len(line)]
i = 0
pos = 0
while pos < len(blob):
    n = 4093 + 977 * (i % 11)
    out.write(blob[pos : pos + n])
    pos += n
    i += 1
out.flush()
"""


def _expected_big() -> bytes:
    unit = "aé€😀".encode()
    line = unit * 6553 + b"\n"
    total = 100 * 1024 * 1024
    blob = line * (total // len(line) + 1)
    return blob[: total - total % len(line)]


@pytest.mark.timeout(120)
def test_100mb_multibyte_stdout_intact(local_modal: LocalModal, app: Any, backend: str) -> None:
    expected = hashlib.sha256(_expected_big()).hexdigest()
    sb = modal.Sandbox.create("python", "-c", BIG_OUTPUT, app=app, client=local_modal.client)
    live = hashlib.sha256()
    size = 0
    for piece in sb.stdout:  # read while it is being written
        data = piece.encode()
        live.update(data)
        size += len(data)
    sb.wait()
    assert sb.returncode == 0
    assert size >= 100 * 1024 * 1024 - 64 * 1024
    assert live.hexdigest() == expected
    # after exit, from offset 0: only the output window's tail is left, as on Modal
    # (docs/modal-rules.md), starting at a whole character
    again = modal.Sandbox.from_id(sb.object_id, client=local_modal.client)
    blob = _expected_big()
    start = len(blob) - DEFAULT_OUTPUT_WINDOW
    while blob[start] & 0xC0 == 0x80:
        start += 1
    tail = hashlib.sha256(blob[start:]).hexdigest()
    assert hashlib.sha256(again.stdout.read().encode()).hexdigest() == tail


@pytest.mark.timeout(120)
def test_50_sandboxes_at_once(local_modal: LocalModal, app: Any) -> None:
    n = 50

    async def run_all() -> list[tuple[str, int, str]]:
        async def one(i: int) -> tuple[str, int, str]:
            sb = await modal.Sandbox.create.aio(
                "python",
                "-c",
                f"import sys; print({i}); sys.exit({i % 7})",
                app=app,
                client=local_modal.client,
            )
            await sb.wait.aio(raise_on_termination=False)
            return sb.object_id, sb.returncode, await sb.stdout.read.aio()

        return await asyncio.gather(*(one(i) for i in range(n)))

    t0 = time.monotonic()
    results = asyncio.run(run_all())
    elapsed = time.monotonic() - t0
    assert [(rc, out) for _, rc, out in results] == [(i % 7, f"{i}\n") for i in range(n)]
    records = {r.id: r for r in local_modal.sandboxes()}
    for sid, rc, _ in results:
        rec = records[sid]
        assert rec.returncode == rc and rec.status == "exited"
        assert rec.pid is not None and not pid_alive(rec.pid)
        with pytest.raises(ProcessLookupError):
            os.kill(rec.pid, 0)
    assert elapsed < 60


def _init_pid(lm: LocalModal, sandbox_id: str) -> int:
    """The pid the server reaches the sandbox through (`host_pids` reads its PID
    namespace from it), once it is up."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rec = next(r for r in lm.sandboxes() if r.id == sandbox_id)
        if rec.init_pid:
            return rec.init_pid
        time.sleep(0.02)
    raise AssertionError(f"sandbox {sandbox_id} has no init pid")


def _spawned_pids(sb: Any, count: int) -> list[int]:
    """Pids a sandbox printed: pids of its own PID namespace (see `sandbox_pids`)."""
    pids: list[int] = []
    for line in sb.stdout:
        pids.append(int(line))
        if len(pids) == count:
            return pids
    raise AssertionError(f"expected {count} pids, got {pids}")


TREE = (
    "sleep 1000 & echo $!; "
    "sh -c 'sleep 1000 & echo $!; wait' & "
    "setsid sleep 1000 & echo $!; "  # leaves the process group
    "wait"
)


@pytest.mark.timeout(60)
def test_terminate_kills_whole_tree(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = modal.Sandbox.create("sh", "-c", TREE, app=app, client=local_modal.client)
    rec = next(r for r in local_modal.sandboxes() if r.id == sb.object_id)
    pids = host_pids(_init_pid(local_modal, sb.object_id), _spawned_pids(sb, 3))
    main = rec.pid
    assert main is not None and all(pid_alive(p) for p in pids)
    sb.terminate()
    assert sb.poll() == 137
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in [*pids, main]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in [*pids, main])


@pytest.mark.timeout(60)
def test_main_exit_tears_down_the_container(local_modal: LocalModal, app: Any) -> None:
    sb = modal.Sandbox.create(
        "sh", "-c", "sleep 1000 & echo $!; read go; exit 5", app=app, client=local_modal.client
    )
    (child,) = host_pids(_init_pid(local_modal, sb.object_id), _spawned_pids(sb, 1))
    assert pid_alive(child)
    sb.stdin.write(b"go\n")
    sb.stdin.drain()
    sb.wait()
    assert sb.returncode == 5
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child)


@pytest.mark.timeout(60)
def test_server_stop_leaves_no_process(tmp_path: Any) -> None:
    lm = LocalModal(state_dir=tmp_path).start()
    try:
        app = modal.App.lookup("stop-app", create_if_missing=True, client=lm.client)
        sbs = [modal.Sandbox.create("sh", "-c", TREE, app=app, client=lm.client) for _ in range(3)]
        children = [
            p for sb in sbs for p in host_pids(_init_pid(lm, sb.object_id), _spawned_pids(sb, 3))
        ]
        mains = [r.pid for r in lm.sandboxes()]
        ex = sbs[0].exec("sleep", "1000")
        assert ex.poll() is None
    finally:
        lm.stop()
    pids = [p for p in [*children, *mains] if p]
    assert len(pids) == 12
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in pids)
    assert all(r.status == "terminated" for r in lm.sandboxes())
