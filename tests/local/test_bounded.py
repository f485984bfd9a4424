"""A bounded server: output on disk with full replay, finished sandboxes pruned after retention."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import modal
import modal.exception
import pytest
from notices import program_stderr

from prefect_modal.local import LocalModal
from prefect_modal.local.runtime.streams import SMALL_BYTES, TAIL_BYTES

from .conftest import assert_backend

pytestmark = pytest.mark.timeout(90)

# 40 lines of varied text per KiB-ish, far more than the in-memory tail, with multibyte
# characters so that V1's UTF-8-safe cuts are exercised at every chunk boundary
BIG_LINES = 6000
BIG_CODE = (
    "import sys\n"
    f"for i in range({BIG_LINES}):\n"
    "    sys.stdout.write(f'line {i:05d} é€𝄞 ' + 'x' * (i % 97) + '\\n')\n"
    "sys.stderr.write('E' * 200000)\n"
)


def _expected_big() -> str:
    return "".join(f"line {i:05d} é€𝄞 " + "x" * (i % 97) + "\n" for i in range(BIG_LINES))


def _wait_until(check: Any, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def short_retention(tmp_path: Path) -> Iterator[LocalModal]:
    """A server that prunes finished sandboxes three seconds after they end (long enough
    for a loaded machine to read a finished sandbox's output first)."""
    with LocalModal(state_dir=tmp_path / "local-modal", retention_s=3.0) as lm:
        yield lm


def test_output_beyond_the_tail_replays_from_zero(
    local_modal: LocalModal, app: Any, backend: str
) -> None:
    sb = modal.Sandbox.create("python", "-c", BIG_CODE, app=app, client=local_modal.client)
    assert_backend(sb.object_id, backend)
    sb.wait()
    expected = _expected_big()
    assert len(expected.encode()) > 4 * TAIL_BYTES
    first = sb.stdout.read()
    assert first == expected
    # output is in files under the sandbox's directory, whole; memory holds nothing of it
    out_dir = local_modal.state_dir / "sandboxes" / sb.object_id / "output"
    assert (out_dir / "stdout").read_bytes() == expected.encode()
    assert program_stderr((out_dir / "stderr").read_bytes()) == b"E" * 200000
    server_sb = local_modal.registry.sandboxes[sb.object_id]
    assert server_sb.stdout.memory_bytes() == 0 and server_sb.stdout.closed
    # a late handle re-reads from offset 0, twice, and stderr too
    for _ in range(2):
        late = modal.Sandbox.from_id(sb.object_id, client=local_modal.client)
        assert late.stdout.read() == expected
        assert program_stderr(late.stderr.read()) == "E" * 200000


def test_output_read_while_it_is_written(local_modal: LocalModal, app: Any, backend: str) -> None:
    """A reader that follows a running sandbox gets every line once, in order."""
    code = "import sys, time\n" + BIG_CODE.replace(
        "\\n')\n", "\\n')\n    i % 1000 or time.sleep(0.05)\n"
    )
    sb = modal.Sandbox.create("python", "-c", code, app=app, client=local_modal.client)
    assert_backend(sb.object_id, backend)
    lines = list(sb.stdout)
    sb.wait()
    assert "".join(lines) == _expected_big()


def test_exec_output_beyond_the_tail_is_on_disk(
    local_modal: LocalModal, app: Any, backend: str
) -> None:
    sb = modal.Sandbox.create("sleep", "30", app=app, client=local_modal.client)
    assert_backend(sb.object_id, backend)
    try:
        p = sb.exec("python", "-c", BIG_CODE)
        p.wait()
        assert p.stdout.read() == _expected_big()
        assert p.stderr.read() == "E" * 200000
        small = sb.exec("python", "-c", "print('tiny')")
        small.wait()
        assert small.stdout.read() == "tiny\n"
        server_sb = local_modal.registry.sandboxes[sb.object_id]
        buffers = [b for ex in server_sb.execs.values() for b in (ex.stdout, ex.stderr)]
        on_disk = [b for b in buffers if b.on_disk]
        # the big exec's two streams are files; the tiny ones stay small in memory
        assert len(on_disk) == 2, [len(b) for b in buffers]
        assert all(b.memory_bytes() == 0 for b in on_disk)
        assert all(b.memory_bytes() <= SMALL_BYTES for b in buffers)
        files = sorted((local_modal.state_dir / "sandboxes" / sb.object_id / "output").iterdir())
        assert any(f.read_bytes() == _expected_big().encode() for f in files)
    finally:
        sb.terminate()


def test_finished_sandbox_is_pruned_after_retention(
    short_retention: LocalModal, backend: str
) -> None:
    lm = short_retention
    app = modal.App.lookup("prune", create_if_missing=True, client=lm.client)
    code = "open('data.txt', 'w').write('a file in the root'); print('bye')"
    sb = modal.Sandbox.create("python", "-c", code, workdir="/srv", app=app, client=lm.client)
    assert_backend(sb.object_id, backend)
    sb.wait()
    root = lm.state_dir / "sandboxes" / sb.object_id
    assert (root / "fs" / "srv" / "data.txt").is_file()
    assert modal.Sandbox.from_id(sb.object_id, client=lm.client).stdout.read() == "bye\n"
    _wait_until(lambda: sb.object_id not in {r.id for r in lm.sandboxes()})
    _wait_until(lambda: not root.exists())
    listing = (lm.state_dir / "sandboxes.json").read_text()
    assert sb.object_id not in listing
    with pytest.raises(modal.exception.NotFoundError) as err:
        modal.Sandbox.from_id(sb.object_id, client=lm.client)
    assert "pruned after 3 s" in str(err.value), str(err.value)
    assert sb.object_id in str(err.value)
    # a handle the client still holds hears the same
    with pytest.raises(modal.exception.NotFoundError, match="pruned after 3 s"):
        sb.poll()


def test_running_sandbox_is_never_pruned(short_retention: LocalModal, backend: str) -> None:
    lm = short_retention
    app = modal.App.lookup("keep", create_if_missing=True, client=lm.client)
    sb = modal.Sandbox.create("sleep", "60", app=app, client=lm.client)
    assert_backend(sb.object_id, backend)
    quick = modal.Sandbox.create("python", "-c", "print(1)", app=app, client=lm.client)
    quick.wait()
    try:
        p = sb.exec("python", "-c", "print('done early')")
        p.wait()
        assert p.stdout.read() == "done early\n"
        # past the retention: the finished sandbox and exec go, the running sandbox stays
        server_sb = lm.registry.sandboxes[sb.object_id]
        _wait_until(lambda: quick.object_id not in {r.id for r in lm.sandboxes()})
        _wait_until(lambda: not server_sb.execs)
        (rec,) = [r for r in lm.sandboxes() if r.id == sb.object_id]
        assert rec.status == "running" and time.time() - rec.created_at > 3.0
        assert sb.poll() is None
        assert (lm.state_dir / "sandboxes" / sb.object_id / "fs").is_dir()
        late = sb.exec("python", "-c", "print('still here')")
        late.wait()
        assert late.stdout.read() == "still here\n"
    finally:
        sb.terminate()
    sb.wait(raise_on_termination=False)
    _wait_until(lambda: sb.object_id not in {r.id for r in lm.sandboxes()})


def test_retention_is_validated(tmp_path: Path) -> None:
    for bad in (-1, float("nan"), float("inf"), "1h", True):
        with pytest.raises(ValueError, match=f"retention_s={bad!r}"):
            LocalModal(state_dir=tmp_path / "x", retention_s=bad)  # type: ignore[arg-type]
    for keep in (0, None):
        lm = LocalModal(state_dir=tmp_path / "y", retention_s=keep)
        assert lm.registry.retention_s is None


def test_unknown_sandbox_is_not_called_pruned(short_retention: LocalModal) -> None:
    digest = hashlib.sha256(b"x").hexdigest()[:10]
    with pytest.raises(modal.exception.NotFoundError) as err:
        modal.Sandbox.from_id(f"sb-{digest}", client=short_retention.client).poll()
    assert "not found (finished sandboxes are pruned after 3 s)" in str(err.value)
    assert "was pruned" not in str(err.value)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--retention", "-5", "'--retention': -5: expected seconds >= 0"),
        ("--latency", "fast", "'--latency': 'fast': expected one of 'off', 'modal'"),
        ("--create-rate", "-2", "'--create-rate': -2.0: expected a number >= 0"),
        ("--max-sandboxes", "-1", "'--max-sandboxes': -1: expected a number >= 0"),
    ],
)
def test_cli_refuses_a_bad_serve_option(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    from typer.testing import CliRunner

    from prefect_modal.local.cli import local_app

    result = CliRunner().invoke(
        local_app,
        ["serve", "--state-dir", str(tmp_path), option, value],
        env={"COLUMNS": "300", "NO_COLOR": "1"},
    )
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert message in text, text
    assert not (tmp_path / "sandboxes").exists()  # refused before any server started
