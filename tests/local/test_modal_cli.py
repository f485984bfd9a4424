"""Modal's own CLI (`modal` of modal 1.6.4) against `prefect-modal local serve`.

Each command runs as a subprocess in a fresh HOME with only the variables
`local serve` prints, as a new user would: nothing of this test's process
(no ~/.modal.toml, no token of ours) reaches it.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import modal
import modal.exception
import pytest

from prefect_modal.local import make_client

from .serve_process import start_serve

pytestmark = pytest.mark.timeout(300)

MODAL = str(Path(sys.executable).with_name("modal"))


@dataclass
class Served:
    """A `local serve` process and what it printed."""

    proc: subprocess.Popen[str]
    exports: dict[str, str]
    home: Path
    client: Any

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], "HOME": str(self.home), **self.exports}

    def modal(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run Modal's CLI; with ``check``, a non-zero exit fails with its output."""
        result = subprocess.run(
            [MODAL, *args],
            env=self.env(),
            cwd=self.home,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=180,
        )
        if check:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def modal_json(self, *args: str) -> list[dict[str, Any]]:
        rows = json.loads(self.modal(*args, "--json").stdout)
        assert isinstance(rows, list)
        return rows


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One `local serve` for the module, stopped by its pid at the end."""
    state = tmp_path_factory.mktemp("serve-state")
    home = tmp_path_factory.mktemp("home")
    proc, exports, _ = start_serve(state)
    try:
        assert set(exports) >= {"MODAL_SERVER_URL", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"}
        client = make_client(
            exports["MODAL_SERVER_URL"], exports["MODAL_TOKEN_ID"], exports["MODAL_TOKEN_SECRET"]
        )
        yield Served(proc, exports, home, client)
        client.close()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)


def sandbox(served: Served, app_name: str, *args: str, **kw: Any) -> Any:
    app = modal.App.lookup(app_name, create_if_missing=True, client=served.client)
    return modal.Sandbox.create(*args, app=app, client=served.client, **kw)


def test_volume_list_pages_newest_first_with_dates(served: Served) -> None:
    """101 volumes: more than the client's page of 100, so it asks again with the
    last item's creation time; every volume comes once, newest first, dated."""
    names = [f"pg-{i:03d}" for i in range(101)]
    for name in names:
        modal.Volume.objects.create(name, client=served.client)
    rows = served.modal_json("volume", "list")
    listed = [r["name"] for r in rows if r["name"].startswith("pg-")]
    assert listed == names[::-1]
    dates = [r["created_at"] for r in rows if r["name"].startswith("pg-")]
    assert all(dates) and dates == sorted(dates, reverse=True)
    # the client's own paging, with a limit of its own
    three = modal.Volume.objects.list(max_objects=3, client=served.client)
    assert len(three) == 3


def test_volume_rename(served: Served) -> None:
    served.modal("volume", "create", "before-rename")
    (served.home / "f.txt").write_text("kept\n")
    served.modal("volume", "put", "before-rename", str(served.home / "f.txt"), "/f.txt")
    served.modal("volume", "rename", "before-rename", "after-rename", "--yes")
    names = {r["name"] for r in served.modal_json("volume", "list")}
    assert "after-rename" in names and "before-rename" not in names
    assert "f.txt" in served.modal("volume", "ls", "after-rename").stdout
    served.modal("volume", "create", "taken")
    taken = served.modal("volume", "rename", "after-rename", "taken", "--yes", check=False)
    assert taken.returncode != 0 and "already exists" in taken.stdout + taken.stderr


def test_secret_list_and_delete(served: Served) -> None:
    served.modal("secret", "create", "cli-listed", "KEY=value-not-shown")
    rows = served.modal_json("secret", "list")
    (row,) = [r for r in rows if r["name"] == "cli-listed"]
    assert row["created_at"]
    assert "value-not-shown" not in json.dumps(rows)
    served.modal("secret", "delete", "cli-listed", "--yes")
    assert "cli-listed" not in {r["name"] for r in served.modal_json("secret", "list")}
    with pytest.raises(modal.exception.NotFoundError):
        modal.Secret.from_name("cli-listed").hydrate(served.client)


def test_app_list_and_stop(served: Served) -> None:
    sb = sandbox(served, "cli-stopped-app", "sleep", "300")
    rows = served.modal_json("app", "list")
    (row,) = [r for r in rows if r["description"] == "cli-stopped-app"]
    assert row["tasks"] == "1" and row["app_id"].startswith("ap-")
    served.modal("app", "stop", "cli-stopped-app", "--yes")
    assert sb.wait(raise_on_termination=False) is None and sb.returncode == 137
    (after,) = [r for r in served.modal_json("app", "list") if r["app_id"] == row["app_id"]]
    assert after["tasks"] == "0" and after["stopped_at"]
    again = served.modal("app", "stop", "cli-stopped-app", "--yes", check=False)
    assert "already stopped" in again.stdout + again.stderr


def test_container_list_logs_and_stop(served: Served) -> None:
    sb = sandbox(served, "cli-containers", "sh", "-c", "echo hello-from-logs; sleep 300")
    assert next(iter(sb.stdout)) == "hello-from-logs\n"
    task_id = sb._get_task_id()
    rows = served.modal_json("container", "list")
    assert task_id in {r["container_id"] for r in rows}
    assert "hello-from-logs" in served.modal("container", "logs", sb.object_id).stdout
    assert "hello-from-logs" in served.modal("container", "logs", task_id).stdout
    served.modal("container", "stop", task_id, "--yes")
    assert sb.wait(raise_on_termination=False) is None and sb.returncode == 137
    assert task_id not in {r["container_id"] for r in served.modal_json("container", "list")}


def test_container_exec_with_and_without_a_pty(served: Served) -> None:
    sb = sandbox(served, "cli-exec", "sleep", "300")
    task_id = sb._get_task_id()
    no_pty = served.modal("container", "exec", "--no-pty", task_id, "tty", check=False)
    assert "not a tty" in no_pty.stdout
    # with a pty, the CLI itself needs a terminal: it puts it in raw mode
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [MODAL, "container", "exec", "--pty", task_id, "tty"],
        env={**served.env(), "TERM": "xterm"},
        cwd=served.home,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, out
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the CLI exited and closed its terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(60) == 0, out
    finally:
        os.close(master)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert b"/dev/pts/" in out, out
    sb.terminate()


def test_shell_into_a_sandbox(served: Served) -> None:
    sb = sandbox(served, "cli-shell", "sleep", "300")
    result = served.modal("shell", sb.object_id, "--cmd", "echo hi")
    assert result.stdout == "hi\n"
    # --cmd is split as words, not run by a shell (modal/cli/shell.py: shlex.split)
    env = served.modal("shell", sb.object_id, "--cmd", "printenv MODAL_SANDBOX_ID")
    assert env.stdout == f"{sb.object_id}\n"
    sb.terminate()


def test_modal_run_a_local_entrypoint_that_starts_a_sandbox(served: Served) -> None:
    (served.home / "run_app.py").write_text(
        textwrap.dedent(
            """
            import modal

            app = modal.App("cli-run-app")

            @app.local_entrypoint()
            def main():
                sb = modal.Sandbox.create("echo", "printed-by-the-sandbox", app=app)
                sb.wait()
                print("entrypoint got:", sb.stdout.read().strip())
            """
        )
    )
    result = served.modal("run", "run_app.py::main")
    assert "entrypoint got: printed-by-the-sandbox" in result.stdout
    # the app lived while its client ran, and stopped when it disconnected
    (row,) = [r for r in served.modal_json("app", "list") if r["description"] == "cli-run-app"]
    assert row["stopped_at"] and row["tasks"] == "0"


def test_a_function_call_fails_saying_functions_are_not_served(served: Served) -> None:
    (served.home / "fn_app.py").write_text(
        textwrap.dedent(
            """
            import modal

            app = modal.App("cli-fn-app")

            @app.function()
            def f():
                return 1
            """
        )
    )
    result = served.modal("run", "fn_app.py::f", check=False)
    assert result.returncode != 0
    assert "Modal Functions are not served by the local Modal server" in (
        result.stdout + result.stderr
    )
