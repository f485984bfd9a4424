"""Attacks on the server itself through the file and volume APIs (issue 22, "The server itself").

Each test drives the real modal client against `prefect-modal local serve` in a
process of its own, so the server's memory is its own (``/proc/<pid>/status``)
and a server an attack wedged can be stopped by its pid:

* a file-API read of a symlink to ``/dev/zero`` is refused, and the server does
  not grow (it grew by 300 MiB a second);
* reads (and writes) of FIFOs are refused without blocking, and ``terminate()``
  of another sandbox completes meanwhile (blocked reads filled the server's
  thread pool, and terminate waited for it);
* a volume upload whose temporary file a sandbox swaps for a symlink to a host
  file leaves the host file's mode alone (the server chmod-ed it by name);
* a read over Modal's limit raises Modal's ``SandboxFilesystemFileTooLargeError``;
* a large regular file still round-trips, with the server's memory flat.

A memory watchdog polls the server's resident size while an attack runs and
stops the server (by its pid) if it grows past `GROWTH_KILL_BYTES`: without the
hardening the test then fails on the growth, and the machine is spared.
Waits on a call that could hang are bounded by `HANG_S`, far above what the
call takes: a hang detector, not a timing assertion.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import modal
import modal.exception
import pytest

from prefect_modal.local import make_client

from .serve_process import start_serve

pytestmark = pytest.mark.timeout(300)

MIB = 1024 * 1024
#: a server that grows this much during an attack is stopped (the test then fails)
GROWTH_KILL_BYTES = 384 * MIB
#: how much the server may grow while it answers an attack or moves a large file
#: (chunks of 1 MiB, stream tails, gRPC buffers; a whole-file read would be the file)
GROWTH_ALLOWED_BYTES = 96 * MIB
#: a call that has not returned after this long is taken as hung
HANG_S = 60.0


def _rss(pid: int) -> int:
    """The resident size of process ``pid``, in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Served:
    proc: subprocess.Popen[str]
    client: Any
    app: Any

    def sandbox(self, *args: str, **kw: Any) -> Any:
        return modal.Sandbox.create(*args, app=self.app, client=self.client, **kw)

    def sleeper(self, **kw: Any) -> Any:
        return self.sandbox("sleep", "infinity", **kw)


@dataclass
class Watchdog:
    """Polls a server's resident size; past ``kill_at`` it stops the server by its pid."""

    pid: int
    baseline: int
    kill_at: int
    peak: int = 0
    killed: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = _rss(self.pid)
            except (OSError, AssertionError):
                return  # gone
            self.peak = max(self.peak, rss)
            if rss > self.kill_at and not self.killed:
                self.killed = True
                os.kill(self.pid, signal.SIGKILL)
                return
            self._stop.wait(0.01)

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.baseline)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """A `local serve` of its own for each test (its memory is the test's measure),
    stopped by its pid at the end."""
    proc, exports, _ = start_serve(tmp_path / "state")
    try:
        client = make_client(
            exports["MODAL_SERVER_URL"], exports["MODAL_TOKEN_ID"], exports["MODAL_TOKEN_SECRET"]
        )
        app = modal.App.lookup("hardening", create_if_missing=True, client=client)
        yield Served(proc, client, app)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # wedged by an attack: no clean stop left
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)


def _watched(served: Served, call: Callable[[], Any]) -> tuple[Watchdog, Any]:
    """Run ``call`` while a `Watchdog` watches the server; returns the watchdog and
    what the call returned or raised."""
    pid = served.proc.pid
    dog = Watchdog(pid, _rss(pid), _rss(pid) + GROWTH_KILL_BYTES)
    watcher = threading.Thread(target=dog.run, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(call)
            try:
                outcome: Any = future.result(timeout=HANG_S)
            except BaseException as exc:  # what the call raised is the outcome
                outcome = exc
    finally:
        dog._stop.set()
        watcher.join()
    return dog, outcome


def _wait_for(check: Callable[[], bool]) -> None:
    """Wait (bounded by `HANG_S`) until ``check()`` holds."""
    end = time.monotonic() + HANG_S
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not ready after {HANG_S} s")
        time.sleep(0.05)


def _sh(sb: Any, script: str) -> None:
    p = sb.exec("sh", "-c", script)
    assert p.wait() == 0, p.stderr.read()


def _warm_up(sb: Any) -> None:
    """One file-API round trip first, so the baseline has its code paths loaded."""
    sb.filesystem.write_bytes(b"warm", "/tmp/warm")
    assert sb.filesystem.read_bytes("/tmp/warm") == b"warm"


# ----- /dev/zero --------------------------------------------------------------------


def test_dev_zero_symlink_read_is_refused_and_the_server_does_not_grow(
    served: Served, tmp_path: Path
) -> None:
    sb = served.sleeper()
    _sh(sb, "ln -s /dev/zero /tmp/zero")
    _warm_up(sb)
    dog, outcome = _watched(served, lambda: sb.filesystem.read_bytes("/tmp/zero"))
    print(f"/dev/zero read: the server grew by {dog.growth / MIB:.1f} MiB")
    assert not dog.killed, f"the server grew past {GROWTH_KILL_BYTES // MIB} MiB and was stopped"
    assert isinstance(outcome, modal.exception.SandboxFilesystemError), outcome
    assert "Not a regular file" in str(outcome) and "character device" in str(outcome)
    assert dog.growth < GROWTH_ALLOWED_BYTES, dog.growth
    # the same for a copy to a local file, which streams. The local target is a file of the
    # test's own: Modal's client writes a temporary file beside the target and renames it
    # over it, so a target in /dev would need a writable /dev (only root has one) and,
    # had the copy succeeded, would have replaced the device
    local = tmp_path / "out" / "zero"
    dog, outcome = _watched(served, lambda: sb.filesystem.copy_to_local("/tmp/zero", local))
    assert not dog.killed
    assert isinstance(outcome, modal.exception.SandboxFilesystemError), outcome
    assert "Not a regular file" in str(outcome) and "character device" in str(outcome)
    assert list(local.parent.iterdir()) == []  # neither the target nor the client's temporary
    assert dog.growth < GROWTH_ALLOWED_BYTES, dog.growth
    sb.terminate()


# ----- FIFOs ------------------------------------------------------------------------


def test_fifo_reads_are_refused_and_terminate_of_another_sandbox_completes(
    served: Served,
) -> None:
    """More FIFO reads at once than the server's thread pool has threads (asyncio's
    default: min(32, cpus + 4)), then terminate() of another sandbox."""
    victim, other = served.sleeper(), served.sleeper()
    _sh(victim, "mkfifo /tmp/pipe")
    readers = min(32, (os.cpu_count() or 1) + 4) + 2

    def read() -> Any:
        try:
            return victim.filesystem.read_bytes("/tmp/pipe")
        except modal.exception.SandboxFilesystemError as exc:
            return exc

    with ThreadPoolExecutor(readers + 1) as pool:
        reads = [pool.submit(read) for _ in range(readers)]
        write = pool.submit(
            lambda: _raised(lambda: victim.filesystem.write_bytes(b"x", "/tmp/pipe"))
        )
        terminated = pool.submit(
            lambda: (other.terminate(), other.wait(raise_on_termination=False))
        )
        try:
            terminated.result(timeout=HANG_S)
            outcomes = [f.result(timeout=HANG_S) for f in reads]
            wrote = write.result(timeout=HANG_S)
        except TimeoutError:
            served.proc.kill()  # the server is wedged: stop it, so the pool's threads end
            raise AssertionError("a FIFO read, or terminate() beside it, hung") from None
    assert other.poll() is not None
    for outcome in outcomes:
        assert isinstance(outcome, modal.exception.SandboxFilesystemError), outcome
        assert "named pipe" in str(outcome)
    assert isinstance(wrote, modal.exception.SandboxFilesystemError), wrote
    # the sandbox itself still reads and writes its pipe as a pipe
    _sh(victim, '(echo through > /tmp/pipe &) ; read line < /tmp/pipe; test "$line" = through')
    victim.terminate()


def _terminate(sb: Any) -> None:
    sb.terminate()
    sb.wait(raise_on_termination=False)


def _raised(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:
        return exc


def test_volume_fifo_is_refused_by_read_and_copy(served: Served) -> None:
    vol = modal.Volume.from_name("fifos", create_if_missing=True, version=2, client=served.client)
    sb = served.sleeper(volumes={"/vol": vol})
    _sh(sb, "mkfifo /vol/pipe && ln -s /dev/zero /vol/zero")

    def read(name: str) -> Any:
        return _raised(lambda: b"".join(vol.read_file(name)))

    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(read, "pipe"),
            pool.submit(read, "zero"),
            pool.submit(_raised, lambda: vol.copy_files(["pipe"], "copied")),
        ]
        try:
            outcomes = [f.result(timeout=HANG_S) for f in futures]
        except TimeoutError:
            served.proc.kill()
            raise AssertionError("a volume read or copy of a FIFO hung") from None
    assert isinstance(outcomes[0], modal.exception.InvalidError), outcomes[0]
    assert "not a regular file" in str(outcomes[0])
    # the symlink resolves inside the volume, where there is no /dev/zero
    assert isinstance(outcomes[1], FileNotFoundError), outcomes[1]
    assert isinstance(outcomes[2], modal.exception.InvalidError), outcomes[2]
    sb.terminate()


# ----- the upload's temporary file ----------------------------------------------------

RACER = r"""
import os, sys
target = sys.argv[1]
swapped = 0
n = 0
open("/vol/ready", "w").close()
while not os.path.lexists("/vol/stop"):  # it may be swapped too
    for name in os.listdir("/vol"):
        if ".upload-" not in name or os.path.islink("/vol/" + name):
            continue
        n += 1
        link = f"/vol/.racer-{n}"
        try:
            os.symlink(target, link)
            os.rename(link, "/vol/" + name)
            swapped += 1
        except OSError:
            pass
print(swapped, flush=True)
"""


def test_upload_temp_file_swapped_for_a_symlink_leaves_the_host_file_alone(
    served: Served, tmp_path: Path
) -> None:
    """A sandbox that mounts the volume swaps every temporary file of an upload it sees
    for a symlink to a canary host file; the server used to chmod it by name."""
    canary = tmp_path / "canary.txt"
    canary.write_text("canary\n")
    canary.chmod(0o600)
    vol = modal.Volume.from_name("swap", create_if_missing=True, version=2, client=served.client)
    racer = served.sandbox("python3", "-c", RACER, str(canary), volumes={"/vol": vol})
    _wait_for(lambda: any(e.path == "ready" for e in vol.listdir("/")))  # the racer is on
    data = os.urandom(48 * MIB)  # a copy that takes a while: the racer's window
    caught = 0
    for i in range(20):  # until the racer has won the race a few times
        with vol.batch_upload(force=True) as batch:
            batch.put_file(io.BytesIO(data), f"/upload-{i}.bin", mode=0o755)
        # a won race leaves the racer's symlink where the upload was renamed to
        (entry,) = vol.listdir(f"/upload-{i}.bin")
        caught += entry.type == modal.volume.FileEntryType.SYMLINK
        if caught >= 3:
            break
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b""), "/stop")
    racer.wait(raise_on_termination=False)
    assert racer.returncode == 0, racer.stderr.read()
    swapped = int(racer.stdout.read().strip())
    print(f"upload race: {swapped} swaps by the sandbox, {caught} upload(s) of {i + 1} caught")
    assert stat.S_IMODE(canary.stat().st_mode) == 0o600
    assert canary.read_text() == "canary\n"
    # the attack was made: the racer swapped temporary files (else this proves nothing)
    assert swapped > 0 and caught > 0, (swapped, caught)


# ----- the size limit and large files --------------------------------------------------


def test_a_read_over_modals_limit_raises_file_too_large(served: Served) -> None:
    """Modal reads files of up to 5 GB through the file API (guide, Sandbox filesystem
    access); a sparse 6 GiB file is over it, and costs no disk."""
    sb = served.sleeper()
    _sh(sb, "truncate -s 6G /tmp/big && truncate -s 1M /tmp/small")
    _warm_up(sb)
    dog, outcome = _watched(served, lambda: sb.filesystem.read_bytes("/tmp/big"))
    print(f"6 GiB read: the server grew by {dog.growth / MIB:.1f} MiB")
    assert not dog.killed, f"the server grew past {GROWTH_KILL_BYTES // MIB} MiB and was stopped"
    assert isinstance(outcome, modal.exception.SandboxFilesystemFileTooLargeError), outcome
    assert "/tmp/big" in str(outcome)
    assert sb.filesystem.read_bytes("/tmp/small") == b"\0" * MIB
    sb.terminate()


def test_a_large_regular_file_round_trips_with_the_servers_memory_flat(
    served: Served, tmp_path: Path
) -> None:
    sb = served.sleeper()
    _warm_up(sb)
    local = tmp_path / "big.bin"
    with open(local, "wb") as f:
        for _ in range(192):
            f.write(os.urandom(MIB))
    back = tmp_path / "back.bin"

    def round_trip() -> None:
        sb.filesystem.copy_from_local(local, "/tmp/big.bin")
        sb.filesystem.copy_to_local("/tmp/big.bin", back)

    dog, outcome = _watched(served, round_trip)
    print(f"192 MiB round trip: the server grew by {dog.growth / MIB:.1f} MiB")
    assert not dog.killed, f"the server grew past {GROWTH_KILL_BYTES // MIB} MiB and was stopped"
    assert outcome is None, outcome
    assert _sha(back) == _sha(local)
    assert sb.filesystem.stat("/tmp/big.bin").size == 192 * MIB
    assert dog.growth < GROWTH_ALLOWED_BYTES, f"the server grew by {dog.growth // MIB} MiB"
    sb.terminate()


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def test_writes_follow_no_symlink_out_and_touch_only_regular_files(served: Served) -> None:
    """A write to a symlink to a device or FIFO is refused; one to a symlink to a file of
    the sandbox's writes that file (as ``modal-sandbox-fs-tools`` would), inside the root."""
    sb = served.sleeper()
    _sh(sb, "echo old > /tmp/real && ln -s /tmp/real /tmp/link && ln -s /dev/null /tmp/null")
    sb.filesystem.write_bytes(b"new\n", "/tmp/link")
    assert sb.filesystem.read_bytes("/tmp/real") == b"new\n"
    with pytest.raises(modal.exception.SandboxFilesystemError, match="character device"):
        sb.filesystem.write_bytes(b"x", "/tmp/null")
    sb.filesystem.write_bytes(b"fresh", "/tmp/dir/new.txt")
    assert sb.filesystem.read_bytes("/tmp/dir/new.txt") == b"fresh"
    sb.terminate()


# ----- v1 volume views and removing trees ----------------------------------------------


def test_a_v1_view_with_a_fifo_still_merges_its_files(served: Served) -> None:
    """A v1 volume gets a sandbox's writes when it ends (`volume_views.merge_view`); a FIFO
    the sandbox left in its view is left out, and its files arrive all the same (the
    merge used to copy the FIFO by name and stop there)."""
    vol = modal.Volume.from_name("v1-fifo", create_if_missing=True, client=served.client)
    sb = served.sandbox(
        "sh",
        "-c",
        "mkfifo /vol/pipe && echo kept > /vol/data.txt && ln -s /etc/hostname /vol/link",
        volumes={"/vol": vol},
    )
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 0, sb.stderr.read()
    assert b"".join(vol.read_file("data.txt")) == b"kept\n"
    names = {e.path: e.type for e in vol.listdir("/")}
    assert "pipe" not in names
    assert names.get("link") == modal.volume.FileEntryType.SYMLINK


def test_opening_up_a_tree_never_follows_a_symlink(tmp_path: Path) -> None:
    """`safe_files.open_up_tree` (what `retention.remove_tree` does to a tree a sandbox made
    unwritable): its directories become 0700, a directory a symlink points to is left alone."""
    from prefect_modal.local.runtime import safe_files

    canary = tmp_path / "canary"
    canary.mkdir(mode=0o751)
    canary.chmod(0o751)
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "link").symlink_to(canary, target_is_directory=True)
    (tree / "a" / "b").chmod(0o500)
    (tree / "a").chmod(0o500)
    safe_files.open_up_tree(tree)
    assert stat.S_IMODE((tree / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tree / "a" / "b").stat().st_mode) == 0o700
    assert stat.S_IMODE(canary.stat().st_mode) == 0o751
