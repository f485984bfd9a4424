"""The fork server: ``python -c`` sandboxes forked from a warm interpreter.

Each test runs real sandboxes through the real modal client and checks what
the sandbox process itself sees (argv, environment, fds, session, parent),
so a difference from a freshly exec'd ``python -c`` shows up here.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import modal
import pytest
from waiting import wait_for

from prefect_modal.local import LocalModal, make_client
from prefect_modal.local.records import read_listing
from prefect_modal.local.runtime import forkserver, zygote
from prefect_modal.local.runtime.processes import pid_alive
from prefect_modal.services import start_local_modal

REPORT = r"""
import json, os, sys
print(json.dumps({
    "argv": sys.argv,
    "name": __name__,
    "main_names": sorted(k for k in globals() if not k.startswith("__")),
    "ppid": os.getppid(),
    "pid": os.getpid(),
    "leader": os.getsid(0) == os.getpid() == os.getpgrp(),
    "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "no_site": sys.flags.no_site,
    "stdin": sys.stdin.read(),
}))
"""


def _zygote_pids() -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if zygote.FILENAME.encode() in f.read():
                    found.add(int(name))
        except OSError:
            continue
    return found


def _run(app: Any, client: Any, *args: str, stdin: bytes = b"", **kwargs: Any) -> Any:
    sb = modal.Sandbox.create(*args, app=app, client=client, **kwargs)
    sb.stdin.write(stdin)
    sb.stdin.write_eof()
    sb.stdin.drain()
    sb.wait(raise_on_termination=False)
    return sb


def _report(app: Any, client: Any, *flags: str, **kwargs: Any) -> dict[str, Any]:
    sb = _run(app, client, "python", *flags, "-c", REPORT, "a1", "a2", stdin=b"in", **kwargs)
    assert sb.returncode == 0, sb.stderr.read()
    return dict(json.loads(sb.stdout.read()))


def _sleeper(app: Any, client: Any, with_child: bool = False) -> tuple[Any, list[int]]:
    """A sandbox that sleeps; its first line: its parent's pid (and a child's it started)."""
    spawn = "c = subprocess.Popen(['sleep', '1000']); " if with_child else ""
    shown = "os.getppid(), c.pid" if with_child else "os.getppid()"
    program = f"import os, subprocess, time; {spawn}print({shown}, flush=True); time.sleep(1000)"
    sb = modal.Sandbox.create("python", "-c", program, app=app, client=client)
    return sb, [int(x) for x in next(iter(sb.stdout)).split()]


def _forked_report(app: Any, client: Any, *flags: str, **kwargs: Any) -> dict[str, Any]:
    """A report from a forked sandbox: the first ones start the zygote the ordinary way."""
    server_pid = os.getpid()  # the embedded server runs in this process
    deadline = time.monotonic() + 20
    while True:
        report = _report(app, client, *flags, **kwargs)
        if report["ppid"] != server_pid:
            return report
        assert time.monotonic() < deadline, "no sandbox was forked by the zygote within 20 s"
        time.sleep(0.1)


@pytest.mark.parametrize("flags", [(), ("-S",)], ids=["python-c", "python-S-c"])
def test_a_forked_sandbox_sees_what_python_c_would(
    local_modal: LocalModal, app: Any, flags: tuple[str, ...]
) -> None:
    report = _forked_report(app, local_modal.client, *flags, workdir="/work")
    assert report["ppid"] in _zygote_pids()
    assert report["argv"] == ["-c", "a1", "a2"]
    assert report["name"] == "__main__"
    assert report["main_names"] == ["json", "os", "sys"]  # nothing of the zygote's
    assert report["leader"] is True  # its own session and process group
    assert report["fds"] == [0, 1, 2, 3]  # 3 is the listdir of /proc/self/fd itself
    assert report["no_site"] == (1 if flags else 0)
    assert report["stdin"] == "in"
    root = report["env"]["MODAL_LOCAL_ROOT"]
    assert report["cwd"] == os.path.join(root, "work")
    assert report["env"]["MODAL_SANDBOX_ID"].startswith("sb-")
    plain = _report(app, local_modal.client, *flags)  # the same env keys as any other sandbox
    assert set(plain["env"]) == set(report["env"])


def test_exit_codes_and_tracebacks_are_those_of_python_c(local_modal: LocalModal, app: Any) -> None:
    client = local_modal.client
    _forked_report(app, client)  # the zygote is ready from here on
    server_pid = str(os.getpid())
    ppid = "import os; print(os.getppid(), flush=True); "
    cases = {
        "raise SystemExit(3)": 3,
        "import sys; sys.exit('bye')": 1,
        "x = 1 / 0": 1,
        "def f(:": 1,
        "import os, signal; os.kill(os.getpid(), signal.SIGTERM)": 143,
        "raise KeyboardInterrupt": 130,
        "pass": 0,
    }
    for code, expected in cases.items():
        source = code if code.startswith("def") else ppid + code
        sb = _run(app, client, "python", "-c", source)
        err = sb.stderr.read()
        assert sb.returncode == expected, (code, err)
        assert zygote.FILENAME not in err  # our frames never show
        if code.startswith("def"):
            assert err.startswith('  File "<string>", line 1') and "SyntaxError" in err
        else:
            assert sb.stdout.read().strip() != server_pid, code  # it was forked
    sb = _run(app, client, "python", "-c", "x = 1 / 0")
    err = sb.stderr.read()
    assert err.splitlines()[:2] == [
        "Traceback (most recent call last):",
        '  File "<string>", line 1, in <module>',
    ]
    assert err.splitlines()[-1] == "ZeroDivisionError: division by zero"


def test_secrets_stay_in_their_own_sandbox(local_modal: LocalModal, app: Any) -> None:
    client = local_modal.client
    value = "forked-secret-value-4242"
    first = _forked_report(app, client, secrets=[modal.Secret.from_dict({"TOKEN": value})])
    assert first["env"]["TOKEN"] == value
    later = _forked_report(app, client)
    assert "TOKEN" not in later["env"]
    for pid in _zygote_pids():
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert value.encode() not in f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert value.encode() not in f.read()


def test_what_is_not_forked(tmp_path: Path, app: Any, local_modal: LocalModal) -> None:
    """A memory limit, another interpreter or the switch turned off: exec'd as before."""
    client = local_modal.client
    _forked_report(app, client)
    me = os.getpid()
    limited = _report(app, client, memory=(256, 4096))
    assert limited["ppid"] == me
    other = _run(app, client, "sh", "-c", "echo $PPID")
    assert int(other.stdout.read()) == me
    assert forkserver.ForkServer.match(["python", "-u", "-c", "pass"], {"PATH": ""}) is None
    assert forkserver.ForkServer.match(["/usr/bin/env", "-c", "x"], {"PATH": ""}) is None

    with LocalModal(state_dir=tmp_path / "off", fork_server=False) as off:
        app_off = modal.App.lookup("off", create_if_missing=True, client=off.client)
        reports = [_report(app_off, off.client) for _ in range(3)]
        assert {r["ppid"] for r in reports} == {me}
        assert not (tmp_path / "off" / "forkserver.log").exists()


def test_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(forkserver.ENV_SWITCH, "0")
    assert forkserver.enabled_by_default() is False
    monkeypatch.setenv(forkserver.ENV_SWITCH, "1")
    assert forkserver.enabled_by_default() is True
    monkeypatch.delenv(forkserver.ENV_SWITCH)
    assert forkserver.enabled_by_default() is True


def test_terminate_kills_a_forked_sandbox_and_what_it_started(
    local_modal: LocalModal, app: Any
) -> None:
    client = local_modal.client
    _forked_report(app, client)
    sb, (ppid, child) = _sleeper(app, client, with_child=True)
    assert ppid in _zygote_pids()
    (rec,) = [r for r in local_modal.sandboxes() if r.id == sb.object_id]
    assert rec.pid and pid_alive(rec.pid) and pid_alive(child)
    sb.terminate()
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 137
    wait_for(lambda: not pid_alive(rec.pid) and not pid_alive(child), 5, "no process left")


def test_a_killed_zygote_takes_its_sandboxes_and_is_replaced(
    local_modal: LocalModal, app: Any
) -> None:
    client = local_modal.client
    _forked_report(app, client)
    sb, (zygote_pid,) = _sleeper(app, client)
    assert zygote_pid in _zygote_pids()
    os.kill(zygote_pid, signal.SIGKILL)
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 137  # killed with its zygote, reported as such
    after = _forked_report(app, client)  # sandboxes go on, forked by a new zygote
    assert after["ppid"] != zygote_pid and after["ppid"] in _zygote_pids()


def test_zygote_stops_with_the_server(tmp_path: Path) -> None:
    before = _zygote_pids()
    with LocalModal(state_dir=tmp_path / "s") as lm:
        app = modal.App.lookup("z", create_if_missing=True, client=lm.client)
        _forked_report(app, lm.client)
        ours = _zygote_pids() - before
        assert len(ours) == 1
    wait_for(lambda: not any(pid_alive(p) for p in ours), 10, "no process left")


def test_forked_sandboxes_and_zygote_die_with_a_killed_server(tmp_path: Path) -> None:
    """SIGKILL: the zygote dies with the server, its children with the zygote."""
    server = start_local_modal(tmp_path / "state")
    try:
        client = make_client(
            server.env["MODAL_SERVER_URL"],
            server.env["MODAL_TOKEN_ID"],
            server.env["MODAL_TOKEN_SECRET"],
        )
        app = modal.App.lookup("orphans", create_if_missing=True, client=client)
        deadline = time.monotonic() + 20
        while True:
            sb, (ppid,) = _sleeper(app, client)
            if ppid != server.pid:
                break
            sb.terminate()
            assert time.monotonic() < deadline, "the zygote did not start within 20 s"
            time.sleep(0.1)
        listing = read_listing(tmp_path / "state" / "sandboxes.json")
        rec = next(r for r in listing if r.id == sb.object_id)
        (zygote_pid,) = {p for p in _zygote_pids() if _ppid(p) == server.pid}
        assert rec.pid and pid_alive(rec.pid) and pid_alive(zygote_pid)
        os.kill(server.pid, signal.SIGKILL)  # the server alone: no cleanup runs
        server.process.wait()
        wait_for(lambda: not pid_alive(rec.pid) and not pid_alive(zygote_pid), 5, "no process left")
    finally:
        server.stop()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])
