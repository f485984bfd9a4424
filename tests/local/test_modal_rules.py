"""Modal's rules as the local server models them (docs/modal-rules.md), through the real client.

Each test names the rule it checks; the table in docs/modal-rules.md points here.
"""

from __future__ import annotations

import asyncio
import logging
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import modal
import modal.exception
import pytest
from grpclib import GRPCError, Status
from grpclib.client import Channel
from modal_proto import api_pb2
from modal_proto.api_grpc import ModalClientStub

from prefect_modal.local import LocalModal
from prefect_modal.local.limits import DEFAULT_OUTPUT_WINDOW, Limits

pytestmark = pytest.mark.timeout(90)


def _create(lm: LocalModal, app: Any, *args: str, **kw: Any) -> Any:
    return modal.Sandbox.create(*args, app=app, client=lm.client, **kw)


def test_an_exec_whose_timeout_fires_gives_minus_one(local_modal: LocalModal, app: Any) -> None:
    """modal/container_process.py, ContainerProcess.wait: the client's exec deadline
    gives returncode -1; the server must not answer with the kill's 137 first."""
    sb = _create(local_modal, app, "sleep", "60")
    p = sb.exec("sleep", "30", timeout=1)
    assert p.wait() == -1
    assert p.returncode == -1
    quick = sb.exec("sh", "-c", "exit 3", timeout=20)
    assert quick.wait() == 3  # one that ends in time keeps its own code
    sb.terminate()


async def _raw_create(lm: LocalModal, app_id: str, name: str) -> GRPCError:
    """SandboxCreateV2 sent by a client that does not check names (not modal 1.6.4)."""
    url = urlparse(lm.env["MODAL_SERVER_URL"])
    channel = Channel(url.hostname, url.port)
    try:
        stub = ModalClientStub(channel)
        md = {
            "x-modal-token-id": lm.env["MODAL_TOKEN_ID"],
            "x-modal-token-secret": lm.env["MODAL_TOKEN_SECRET"],
        }
        req = api_pb2.SandboxCreateV2Request(
            app_id=app_id,
            definition=api_pb2.Sandbox(entrypoint_args=["true"], name=name, timeout_secs=60),
        )
        with pytest.raises(GRPCError) as err:
            await stub.SandboxCreateV2(req, metadata=md)
        return err.value
    finally:
        channel.close()


@pytest.mark.parametrize("name", ["has space", "x" * 65, "ap-" + "a" * 22])
def test_sandbox_names_follow_modals_object_name_rule(
    local_modal: LocalModal, app: Any, name: str
) -> None:
    """modal/_utils/name_utils.py, check_object_name: the client refuses such a name;
    the server refuses it too, with the client's words, for clients that do not check."""
    with pytest.raises(modal.exception.InvalidError, match="Invalid Sandbox name"):
        _create(local_modal, app, "true", name=name)
    err = asyncio.run(_raw_create(local_modal, app.app_id, name))
    assert err.status == Status.INVALID_ARGUMENT
    assert "Invalid Sandbox name" in (err.message or "")
    assert local_modal.sandboxes() == []
    ok = _create(local_modal, app, "true", name="a.B-c_" + "9" * 58)  # 64 characters
    assert ok.wait() is None and ok.returncode == 0


def test_creation_is_throttled_with_modals_error(tmp_path: Path) -> None:
    """A 2-per-second throttle: creating faster fails with ResourceExhaustedError and
    Modal's 'Sandbox creation rate limit exceeded' (RESOURCE_EXHAUSTED, not retried by
    modal 1.6.4 without a retry policy)."""
    with LocalModal(state_dir=tmp_path / "lm", limits=Limits(create_rate=2)) as lm:
        app = modal.App.lookup("throttled", create_if_missing=True, client=lm.client)
        made = []
        with pytest.raises(modal.exception.ResourceExhaustedError) as err:
            for _ in range(200):  # the bucket holds 2 and refills 2 a second
                made.append(_create(lm, app, "true"))
        assert "Sandbox creation rate limit exceeded" in str(err.value)
        assert len(made) >= 2  # a full bucket's worth went through first
        for sb in made:
            sb.wait()


def test_running_sandboxes_and_gpus_are_capped(tmp_path: Path) -> None:
    """Caps per workspace (off by default: Modal publishes no number): over the running
    cap, or over the GPU cap (Modal's V1 'Insufficient capacity to create sandbox.')."""
    limits = Limits(max_sandboxes=2, max_gpus=1)
    with LocalModal(state_dir=tmp_path / "lm", limits=limits) as lm:
        app = modal.App.lookup("capped", create_if_missing=True, client=lm.client)
        gpu = _create(lm, app, "sleep", "60", gpu="T4")
        with pytest.raises(modal.exception.ResourceExhaustedError, match="Insufficient capacity"):
            _create(lm, app, "sleep", "60", gpu="T4")
        cpu = _create(lm, app, "sleep", "60")
        with pytest.raises(modal.exception.ResourceExhaustedError, match="Sandbox limit"):
            _create(lm, app, "sleep", "60")
        cpu.terminate()
        cpu.wait(raise_on_termination=False)
        again = _create(lm, app, "true")  # a finished sandbox frees its place
        again.wait()
        gpu.terminate()


def test_limits_are_off_by_default_except_the_output_window() -> None:
    lim = Limits.from_env()
    assert (lim.create_rate, lim.max_sandboxes, lim.max_gpus) == (None, None, None)
    assert lim.output_window == DEFAULT_OUTPUT_WINDOW


def _names(vol: Any) -> set[str]:
    return {e.path for e in vol.listdir("/")}


def _first_line(sb: Any) -> str:
    for line in sb.stdout:
        return str(line)
    return ""


WRITER = "echo v1 > /data/out.txt; rm -f /data/old.txt; echo written; read _; echo end"


def test_an_unversioned_volume_is_v1_and_gets_a_sandboxs_writes_when_it_ends(
    local_modal: LocalModal, app: Any, backend: str
) -> None:
    """modal/volume.py, _validate_volume_version (unset -> v1); Modal's guide, Sandbox
    files: a v1 volume receives a sandbox's writes when the sandbox terminates."""
    c = local_modal.client
    vol = modal.Volume.from_name("rules-v1", create_if_missing=True, client=c)
    with vol.batch_upload() as batch:
        batch.put_file(BytesIO(b"before"), "/old.txt")
    sb = _create(local_modal, app, "sh", "-c", WRITER, volumes={"/data": vol})
    assert _first_line(sb) == "written\n"
    assert _names(vol) == {"old.txt"}  # the Volume API: not yet
    other = _create(local_modal, app, "ls", "/data", volumes={"/data": vol})
    other.wait()
    assert other.stdout.read() == "old.txt\n"  # another sandbox: not yet
    sb.stdin.write(b"go\n")
    sb.stdin.write_eof()
    sb.stdin.drain()
    sb.wait()
    assert _names(vol) == {"out.txt"}  # merged at its end: written, and removed
    assert b"".join(vol.read_file("out.txt")) == b"v1\n"
    # a terminated sandbox's writes land too
    killed = _create(
        local_modal, app, "sh", "-c", WRITER.replace("v1", "killed"), volumes={"/data": vol}
    )
    assert _first_line(killed) == "written\n"
    killed.terminate()
    killed.wait(raise_on_termination=False)
    assert b"".join(vol.read_file("out.txt")) == b"killed\n"


def test_a_v2_volume_is_live(local_modal: LocalModal, app: Any, backend: str) -> None:
    """v2 volumes are live: the Volume API sees a running sandbox's write at once."""
    vol = modal.Volume.from_name(
        "rules-v2", create_if_missing=True, version=2, client=local_modal.client
    )
    sb = _create(local_modal, app, "sh", "-c", WRITER, volumes={"/data": vol})
    assert _first_line(sb) == "written\n"
    assert _names(vol) == {"out.txt"}
    assert b"".join(vol.read_file("out.txt")) == b"v1\n"
    sb.terminate()


def test_output_is_served_from_a_window(
    tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """modal/io_streams.py: a V2 reader whose next chunk starts past its offset warns
    "dropped N bytes; only the most recent portion of output is retained" and goes on
    with the tail. V1 logs (no such message exists there) go on from the window too."""
    window = 64 * 1024
    with LocalModal(state_dir=tmp_path / "lm", limits=Limits(output_window=window)) as lm:
        app = modal.App.lookup("windowed", create_if_missing=True, client=lm.client)
        code = "import sys\nfor i in range(20000): sys.stdout.write(f'{i:07d}\\n')\n"
        sb = _create(lm, app, "python", "-c", code)
        sb.wait()
        with caplog.at_level(logging.WARNING, logger="modal-client"):
            out = sb.stdout.read()
        total = 20000 * 8
        assert len(out) <= window and out.endswith("0019999\n")
        assert not out.startswith("0000000")
        if backend == "v2":
            assert any(
                f"dropped {total - len(out)} bytes; only the most recent portion of output "
                "is retained" in r.getMessage()
                for r in caplog.records
            ), [r.getMessage() for r in caplog.records]
        small = _create(lm, app, "echo", "small")  # under the window: whole
        small.wait()
        assert small.stdout.read() == "small\n"
