"""Every supported client call, through the real modal client, on V1 and V2."""

from __future__ import annotations

import json
import os
import sys
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import modal
import modal.exception
import pytest
from notices import program_stderr

from prefect_modal.local import LocalModal

from .conftest import assert_backend

pytestmark = pytest.mark.timeout(60)

PY = "python"


def _create(lm: LocalModal, app: Any, *args: str, **kw: Any) -> Any:
    return modal.Sandbox.create(*args, app=app, client=lm.client, **kw)


def _record(lm: LocalModal, sandbox_id: str) -> Any:
    (rec,) = [r for r in lm.sandboxes() if r.id == sandbox_id]
    return rec


def test_app_lookup(local_modal: LocalModal) -> None:
    c = local_modal.client
    a = modal.App.lookup("lookup-app", create_if_missing=True, client=c)
    b = modal.App.lookup("lookup-app", create_if_missing=True, client=c)
    other_env = modal.App.lookup(
        "lookup-app", create_if_missing=True, environment_name="dev", client=c
    )
    assert a.app_id == b.app_id and a.app_id.startswith("ap-")
    assert other_env.app_id != a.app_id
    with pytest.raises(modal.exception.NotFoundError):
        modal.App.lookup("no-such-app", client=c)


def test_images_are_recorded(local_modal: LocalModal, app: Any, backend: str) -> None:
    reg = modal.Image.from_registry("python:3.11-slim")
    slim = modal.Image.debian_slim(python_version="3.11").pip_install("cloudpickle")
    sb1 = _create(local_modal, app, PY, "-c", "import cloudpickle; print('ok')", image=reg)
    sb2 = _create(local_modal, app, PY, "-c", "import cloudpickle; print('ok')", image=slim)
    for sb in (sb1, sb2):
        assert_backend(sb.object_id, backend)
        sb.wait()
        assert sb.returncode == 0
        assert sb.stdout.read() == "ok\n"
    assert _record(local_modal, sb1.object_id).image.startswith("python:3.11-slim")
    assert "step" in _record(local_modal, sb2.object_id).image


def test_create_wait_returncode_and_output(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(
        local_modal,
        app,
        PY,
        "-c",
        "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)",
    )
    assert_backend(sb.object_id, backend)
    sb.wait()
    assert sb.returncode == 3
    assert sb.stdout.read() == "out\n"
    assert program_stderr(sb.stderr.read()) == "err\n"
    rec = _record(local_modal, sb.object_id)
    assert (rec.status, rec.returncode, rec.version) == ("exited", 3, 1 if backend == "v1" else 2)


def test_env_secrets_and_clean_environment(
    local_modal: LocalModal, app: Any, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVER_ONLY_VAR", "leak")
    local_modal.define_secret("named", {"NAMED_KEY": "named-value"})
    code = (
        "import os, json;"
        "keys = ['FOO', 'DICT_KEY', 'NAMED_KEY', 'SERVER_ONLY_VAR', 'PYTHONUNBUFFERED'];"
        "print(json.dumps({k: os.environ.get(k) for k in keys} | {'HOME': os.environ['HOME']}))"
    )
    sb = _create(
        local_modal,
        app,
        PY,
        "-c",
        code,
        env={"FOO": "bar"},
        secrets=[
            modal.Secret.from_dict({"DICT_KEY": "dict-value"}),
            modal.Secret.from_name("named"),
        ],
    )
    sb.wait()
    got = json.loads(sb.stdout.read())
    assert (
        got["FOO"] == "bar"
        and got["DICT_KEY"] == "dict-value"
        and got["NAMED_KEY"] == "named-value"
    )
    assert got["SERVER_ONLY_VAR"] is None, "the server's environment must not leak into sandboxes"
    assert got["PYTHONUNBUFFERED"] == "1"
    rec = _record(local_modal, sb.object_id)
    assert got["HOME"] == "/root"  # the sandbox's own /root, as on Modal
    assert rec.secret_names == ["named"]
    assert {"FOO", "DICT_KEY"} <= set(rec.env_names)
    assert "dict-value" not in json.dumps(rec.to_dict()) and "named-value" not in json.dumps(
        rec.to_dict()
    )


def test_secret_from_name_missing(local_modal: LocalModal, app: Any, backend: str) -> None:
    with pytest.raises(modal.exception.NotFoundError, match="nope"):
        _create(local_modal, app, PY, "-c", "pass", secrets=[modal.Secret.from_name("nope")])


def test_python_is_the_servers_python(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, PY, "-c", "import sys, cloudpickle; print(sys.prefix)")
    sb.wait()
    assert sb.stdout.read().strip() == sys.prefix


def test_poll_and_terminate_137(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, "sleep", "60")
    assert sb.poll() is None
    pid = _record(local_modal, sb.object_id).pid
    sb.terminate()
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 137
    assert sb.poll() == 137
    rec = _record(local_modal, sb.object_id)
    assert rec.status == "terminated" and rec.finished_at is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_wait_raises_on_termination(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, "sleep", "60")
    sb.terminate()
    with pytest.raises(modal.exception.SandboxTerminatedError):
        sb.wait()


def test_timeout_124(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, "sleep", "60", timeout=1)
    t0 = time.monotonic()
    with pytest.raises(modal.exception.SandboxTimeoutError):
        sb.wait()
    assert time.monotonic() - t0 < 5
    assert sb.returncode == 124
    assert _record(local_modal, sb.object_id).status == "timeout"


def test_idle_timeout(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, "sleep", "60", idle_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(modal.exception.SandboxTimeoutError):  # an idle timeout is a timeout
        sb.wait()
    assert 0.9 < time.monotonic() - t0 < 6
    assert sb.returncode == 124


def test_timeout_above_24h_is_rejected(local_modal: LocalModal, app: Any, backend: str) -> None:
    with pytest.raises(modal.exception.InvalidError, match="86400"):
        _create(local_modal, app, "true", timeout=86401)


def test_wait_returns_promptly(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, PY, "-c", "import time; time.sleep(0.3)")
    t0 = time.monotonic()
    sb.wait()
    assert time.monotonic() - t0 < 1.5


def test_ids_have_modals_shapes(local_modal: LocalModal, app: Any, backend: str) -> None:
    """The client routes the id to the back end that made it, and Modal's CLI
    (`modal shell`, `modal container`) takes it: ``sb-`` then letters and digits."""
    from modal.cli.shell import _is_valid_modal_id
    from modal.sandbox._common import SandboxVersion, _get_sandbox_version

    sb = _create(local_modal, app, "true")
    want = SandboxVersion.V1 if backend == "v1" else SandboxVersion.V2
    assert _get_sandbox_version(sb.object_id) == want, sb.object_id
    assert _is_valid_modal_id(sb.object_id, "sb-"), sb.object_id
    assert _is_valid_modal_id(sb._get_task_id(), "ta-")
    sb.wait(raise_on_termination=False)


def test_from_id_and_from_name(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, "sleep", "60", name="by-name")
    same = modal.Sandbox.from_id(sb.object_id, client=local_modal.client)
    assert same.object_id == sb.object_id and same.poll() is None
    named = modal.Sandbox.from_name(app.name, "by-name", client=local_modal.client)
    assert named.object_id == sb.object_id
    with pytest.raises(modal.exception.NotFoundError):
        modal.Sandbox.from_name(app.name, "no-such-name", client=local_modal.client)
    with pytest.raises(modal.exception.NotFoundError):
        modal.Sandbox.from_id("sb-doesNotExist0000000000000", client=local_modal.client).poll()
    sb.terminate()
    done = modal.Sandbox.from_id(sb.object_id, client=local_modal.client)
    assert done.returncode == 137


def test_names_are_unique_per_app(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, "sleep", "60", name="unique")
    with pytest.raises(modal.exception.AlreadyExistsError):
        _create(local_modal, app, "sleep", "60", name="unique")
    other = modal.App.lookup(app.name + "-other", create_if_missing=True, client=local_modal.client)
    sb2 = _create(local_modal, other, "sleep", "60", name="unique")  # another app: fine
    sb.terminate()
    sb.wait(raise_on_termination=False)
    sb3 = _create(local_modal, app, "true", name="unique")  # a finished sandbox frees its name
    sb3.wait()
    assert sb3.returncode == 0
    sb2.terminate()


def test_list_tags_and_paging(
    local_modal: LocalModal, app: Any, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect_modal.local.api import context

    monkeypatch.setattr(
        context, "LIST_PAGE", 2
    )  # force several pages: before_timestamp must be honoured
    sbs = [
        _create(local_modal, app, "sleep", "60", tags={"run": "r1", "i": str(i)}) for i in range(5)
    ]
    other = _create(local_modal, app, "sleep", "60", tags={"run": "r2"})
    listed = {
        s.object_id
        for s in modal.Sandbox.list(
            app_id=app.app_id, tags={"run": "r1"}, client=local_modal.client
        )
    }
    assert listed == {s.object_id for s in sbs}
    everything = {
        s.object_id for s in modal.Sandbox.list(app_id=app.app_id, client=local_modal.client)
    }
    assert everything == listed | {other.object_id}
    sbs[0].set_tags({"run": "moved"})
    assert sbs[0].get_tags() == {"run": "moved"}
    assert _record(local_modal, sbs[0].object_id).tags == {"run": "moved"}
    after = {
        s.object_id
        for s in modal.Sandbox.list(
            app_id=app.app_id, tags={"run": "r1"}, client=local_modal.client
        )
    }
    assert after == {s.object_id for s in sbs[1:]}
    sbs[1].terminate()
    sbs[1].wait(raise_on_termination=False)
    running = {
        s.object_id
        for s in modal.Sandbox.list(
            app_id=app.app_id, tags={"run": "r1"}, client=local_modal.client
        )
    }
    assert sbs[1].object_id not in running


def test_stdin(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(
        local_modal, app, PY, "-c", "import sys\nfor line in sys.stdin: print('got', line.strip())"
    )
    sb.stdin.write(b"hello\n")
    sb.stdin.drain()
    sb.stdin.write("wörld\n")
    sb.stdin.write_eof()
    sb.stdin.drain()
    sb.wait()
    assert sb.stdout.read() == "got hello\ngot wörld\n"


def test_stdout_iterate_late_and_replay(local_modal: LocalModal, app: Any, backend: str) -> None:
    code = "import time\nfor i in range(5):\n    print(f'line {i}')\n    time.sleep(0.05)"
    sb = _create(local_modal, app, PY, "-c", code)
    lines = list(sb.stdout)  # streams while the process runs
    assert lines == [f"line {i}\n" for i in range(5)]
    sb.wait()
    late = modal.Sandbox.from_id(sb.object_id, client=local_modal.client)
    assert late.stdout.read() == "".join(lines)  # a new handle replays from offset 0
    assert program_stderr(late.stderr.read()) == ""


def test_workdir_is_the_sandboxs_own(local_modal: LocalModal, app: Any, backend: str) -> None:
    code = "import os; open('here.txt', 'w').write('x'); print(os.getcwd())"
    sb = _create(local_modal, app, PY, "-c", code, workdir="/srv")
    sb.wait()
    assert sb.stdout.read() == "/srv\n"
    rec = _record(local_modal, sb.object_id)
    assert rec.workdir == "/srv" and "MODAL_LOCAL_ROOT" not in rec.env_names
    assert (Path(rec.root) / "srv" / "here.txt").read_text() == "x"  # its writable layer
    assert not Path("/srv/here.txt").exists()


def test_missing_workdir_is_created_and_a_file_there_fails(
    local_modal: LocalModal, app: Any, backend: str
) -> None:
    """Modal's runtime creates a missing workdir, and fails a process whose workdir
    cannot be a directory with its own words (modal-client issue #3322)."""
    sb = _create(local_modal, app, "pwd", workdir="/srv/app/deep")
    assert sb.wait() is None and sb.returncode == 0
    assert sb.stdout.read() == "/srv/app/deep\n"
    vol = modal.Volume.from_name("workdir-vol", create_if_missing=True, client=local_modal.client)
    with vol.batch_upload() as batch:
        batch.put_file(BytesIO(b"x"), "/file")
    sb = _create(local_modal, app, "pwd", workdir="/data/file", volumes={"/data": vol})
    sb.wait()
    assert sb.returncode == 126
    assert 'failed to create process working directory "/data/file"' in sb.stderr.read()
    holder = _create(local_modal, app, "sleep", "60")
    holder.filesystem.write_text("x", "/srv/file")
    p = holder.exec("pwd", workdir="/srv/file/sub")
    assert p.wait() == 126
    assert 'failed to create process working directory "/srv/file/sub"' in p.stderr.read()
    assert holder.exec("pwd", workdir="/srv/new").wait() == 0
    holder.terminate()


def test_volumes(local_modal: LocalModal, app: Any, backend: str) -> None:
    vol = modal.Volume.from_name("shared-vol", create_if_missing=True)
    w = _create(
        local_modal,
        app,
        PY,
        "-c",
        "open('/data/f.txt', 'w').write('42')",
        volumes={"/data": vol},
    )
    w.wait()
    assert w.returncode == 0
    r = _create(local_modal, app, "cat", "mnt/f.txt", volumes={"/mnt": vol})  # relative to cwd "/"
    r.wait()
    assert r.stdout.read() == "42"
    assert (local_modal.state_dir / "volumes" / "shared-vol" / "f.txt").read_text() == "42"
    assert _record(local_modal, r.object_id).volumes == {"/mnt": "shared-vol"}


def test_resources_are_recorded(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, "true", cpu=2.0, memory=1024, region="us-east", cloud="aws")
    sb.wait()
    rec = _record(local_modal, sb.object_id)
    assert (rec.cpu, rec.memory_mib, rec.region, rec.cloud) == (2.0, 1024, "us-east", "aws")


def test_memory_limit_is_enforced_when_asked(
    local_modal: LocalModal, app: Any, backend: str
) -> None:
    # with cgroups (runtime.cgroups) the kernel OOM-kills it at its limit, exit 137 as on
    # Modal; without, a (request, limit) pair falls back to RLIMIT_AS of
    # max(2*limit, limit+1GiB): 3 GiB must fail either way
    code = "b = bytearray(3 * 1024**3); print('allocated')"
    sb = _create(local_modal, app, PY, "-c", code, memory=(128, 512))
    sb.wait()
    if "memory" in local_modal.limits_enforced:
        assert sb.returncode == 137 and "allocated" not in sb.stdout.read()
    else:
        assert sb.returncode != 0 and "MemoryError" in sb.stderr.read()
    ok = _create(
        local_modal, app, PY, "-c", "b = bytearray(200 * 1024**2); print('ok')", memory=(128, 512)
    )
    ok.wait()
    assert ok.stdout.read() == "ok\n"


def test_bad_command(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, "no-such-binary-xyz")
    sb.wait()
    assert sb.returncode == 127
    assert "no-such-binary-xyz" in sb.stderr.read()


def test_exec(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, "sleep", "60", env={"BASE": "b"})
    p = sb.exec(
        PY,
        "-c",
        "import os, sys; print(os.environ['BASE'], os.environ['X']);"
        "print('e', file=sys.stderr); sys.exit(4)",
        env={"X": "x"},
    )
    assert p.wait() == 4
    assert p.stdout.read() == "b x\n" and p.stderr.read() == "e\n"
    cat = sb.exec(PY, "-c", "import sys; print(sys.stdin.read().upper())", workdir="/tmp")
    cat.stdin.write(b"abc")
    cat.stdin.write_eof()
    cat.stdin.drain()
    assert cat.wait() == 0 and cat.stdout.read() == "ABC\n"
    slow = sb.exec("sleep", "0.3")
    assert slow.poll() is None
    assert slow.wait() == 0 and slow.poll() == 0
    killed = sb.exec("sh", "-c", "kill -9 $$")
    assert killed.wait() == 137
    sb.terminate()


def test_filesystem(local_modal: LocalModal, app: Any, backend: str) -> None:
    sb = _create(local_modal, app, "sleep", "60")
    blob = bytes(range(256)) * 1000
    sb.filesystem.write_bytes(blob, "/workspace/dir/data.bin")
    assert sb.filesystem.read_bytes("/workspace/dir/data.bin") == blob
    sb.filesystem.write_text("héllo", "/workspace/t.txt")
    assert sb.filesystem.read_text("/workspace/t.txt") == "héllo"
    names = {e.name for e in sb.filesystem.list_files("/workspace")}
    assert names == {"dir", "t.txt"}
    assert sb.filesystem.stat("/workspace/t.txt").size == len("héllo".encode())
    sb.filesystem.make_directory("/workspace/new/sub")
    sb.filesystem.remove("/workspace/new", recursive=True)
    with pytest.raises(modal.exception.SandboxFilesystemNotFoundError):
        sb.filesystem.read_bytes("/workspace/new/missing")
    rec = _record(local_modal, sb.object_id)
    assert (Path(rec.root) / "workspace" / "dir" / "data.bin").read_bytes() == blob
    p = sb.exec("cat", "workspace/t.txt")  # the sandbox's processes see the same files
    assert p.stdout.read() == "héllo"
    sb.terminate()


def test_gpu_runs_on_cpu_with_warning(local_modal: LocalModal, app: Any) -> None:
    sb = _create(local_modal, app, PY, "-c", "print('computed')", gpu="A100:2")
    assert_backend(sb.object_id, "v1")  # gpu= always selects the V1 back end
    sb.wait()
    assert sb.returncode == 0 and sb.stdout.read() == "computed\n"
    first = program_stderr(sb.stderr.read()).splitlines()[0]
    assert "GPU 'A100:2' requested" in first and "CPU" in first
    assert _record(local_modal, sb.object_id).gpu == "A100:2"


def test_refuse_gpu(tmp_path: Path) -> None:
    with LocalModal(state_dir=tmp_path, refuse_gpu=True) as lm:
        app = modal.App.lookup("gpu-app", create_if_missing=True, client=lm.client)
        with pytest.raises(modal.exception.ConflictError, match="refuse_gpu"):
            modal.Sandbox.create("true", app=app, client=lm.client, gpu="H100")
        assert lm.sandboxes() == []
