"""Server-level guarantees: auth, unimplemented RPCs, secrets, the listing, the CLI, orphans."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import modal
import modal.exception
import pytest
from grpclib import GRPCError, Status
from grpclib.client import Channel
from modal_proto import api_pb2
from modal_proto import task_command_router_pb2 as sr_pb2
from modal_proto.task_command_router_grpc import TaskCommandRouterStub

from prefect_modal.local import VERIFIED_CLIENT_VERSIONS, LocalModal, make_client, read_listing
from prefect_modal.local.runtime.processes import pid_alive

from .serve_process import start_serve

pytestmark = pytest.mark.timeout(60)

SECRET = "hunter2-SECRET-VALUE-9f8e7d"


def test_interface(local_modal: LocalModal) -> None:
    assert VERIFIED_CLIENT_VERSIONS == ("1.6.4",)
    assert local_modal.url.startswith("http://127.0.0.1:")
    assert set(local_modal.env) == {"MODAL_SERVER_URL", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"}
    assert local_modal.env["MODAL_SERVER_URL"] == local_modal.url
    assert isinstance(local_modal.client, modal.Client)
    assert local_modal.sandboxes() == []


@pytest.mark.parametrize("creds", [("wrong", "wrong"), ("", "")])
def test_wrong_or_missing_token_is_refused(local_modal: LocalModal, creds: tuple[str, str]) -> None:
    token_id = creds[0] or None
    client = make_client(local_modal.url, token_id or "", creds[1]) if token_id else None
    if client is None:  # no token at all: build a client whose metadata has none
        from modal._utils.async_utils import synchronizer
        from modal.client import _Client

        async def _open() -> Any:
            c = _Client(local_modal.url, api_pb2.CLIENT_TYPE_CLIENT, None)
            await c._open()
            return c

        client = synchronizer._translate_out(synchronizer.create_blocking(_open)())
    t0 = time.monotonic()
    with pytest.raises(modal.exception.AuthError):
        modal.App.lookup("x", create_if_missing=True, client=client)
    assert time.monotonic() - t0 < 2, "refusals must not be retried"
    assert local_modal.registry.apps == {}


def test_token_of_the_right_server_only(tmp_path: Path) -> None:
    with LocalModal(state_dir=tmp_path / "a") as a, LocalModal(state_dir=tmp_path / "b") as b:
        crossed = make_client(a.url, b.credentials.token_id, b.credentials.token_secret)
        with pytest.raises(modal.exception.AuthError):
            modal.App.lookup("x", create_if_missing=True, client=crossed)


def test_router_requires_a_token_for_that_task(local_modal: LocalModal, app: Any) -> None:
    import asyncio

    sb1 = modal.Sandbox.create("sleep", "60", app=app, client=local_modal.client)
    sb2 = modal.Sandbox.create("sleep", "60", app=app, client=local_modal.client)
    rec = {r.id: r for r in local_modal.sandboxes()}
    task1, task2 = rec[sb1.object_id].task_id, rec[sb2.object_id].task_id
    jwt_for_2 = local_modal.credentials.mint_jwt(task2)

    async def call(token: str | None) -> Status:
        channel = Channel("127.0.0.1", local_modal.port)
        try:
            stub = TaskCommandRouterStub(channel)
            md = {"authorization": f"Bearer {token}"} if token else {}
            await stub.TaskExecPoll(
                sr_pb2.TaskExecPollRequest(task_id=task1, exec_id="x"), metadata=md
            )
            return Status.OK
        except GRPCError as exc:
            return exc.status
        finally:
            channel.close()

    assert asyncio.run(call(None)) == Status.UNAUTHENTICATED
    assert asyncio.run(call("not.a.jwt")) == Status.UNAUTHENTICATED
    assert asyncio.run(call(jwt_for_2)) == Status.UNAUTHENTICATED  # valid, but for another task
    assert (
        asyncio.run(call(local_modal.credentials.mint_jwt(task1))) == Status.NOT_FOUND
    )  # no such exec
    sb1.terminate()
    sb2.terminate()


def test_unimplemented_rpc_answers_unimplemented(local_modal: LocalModal) -> None:
    import asyncio

    async def call() -> Status:
        channel = Channel("127.0.0.1", local_modal.port)
        try:
            from modal_proto.api_grpc import ModalClientStub

            md = {
                "x-modal-token-id": local_modal.credentials.token_id,
                "x-modal-token-secret": local_modal.credentials.token_secret,
            }
            await ModalClientStub(channel).FunctionGet(
                api_pb2.FunctionGetRequest(app_name="a"), metadata=md
            )
            return Status.OK
        except GRPCError as exc:
            return exc.status
        finally:
            channel.close()

    assert asyncio.run(call()) == Status.UNIMPLEMENTED


def test_client_version_warning(local_modal: LocalModal, caplog: pytest.LogCaptureFixture) -> None:
    from modal._utils.async_utils import synchronizer
    from modal.client import _Client

    creds = (local_modal.credentials.token_id, local_modal.credentials.token_secret)

    async def _open() -> Any:
        c = _Client(local_modal.url, api_pb2.CLIENT_TYPE_CLIENT, creds, version="0.99.0")
        await c._open()
        return c

    old = synchronizer._translate_out(synchronizer.create_blocking(_open)())
    with (
        caplog.at_level(logging.WARNING, logger="prefect_modal.local"),
        pytest.warns(UserWarning, match="0.99.0"),
    ):
        modal.App.lookup("versioned", create_if_missing=True, client=old)
    assert any("0.99.0" in r.getMessage() and "1.6.4" in r.getMessage() for r in caplog.records)


def test_listing_file_is_written(local_modal: LocalModal, app: Any) -> None:
    sb = modal.Sandbox.create(
        "true", app=app, client=local_modal.client, name="listed", tags={"k": "v"}
    )
    sb.wait()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        listed = {r.id: r for r in read_listing(local_modal.state_dir / "sandboxes.json")}
        if listed.get(sb.object_id) and listed[sb.object_id].status == "exited":
            break
        time.sleep(0.02)
    rec = listed[sb.object_id]
    assert (rec.name, rec.tags, rec.returncode, rec.app_name) == ("listed", {"k": "v"}, 0, app.name)
    assert rec == next(r for r in local_modal.sandboxes() if r.id == sb.object_id)


def test_secret_values_never_leave_the_sandbox(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    caplog.set_level(logging.DEBUG)
    with LocalModal(state_dir=tmp_path, secrets={"named": {"NAMED": SECRET + "-named"}}) as lm:
        app = modal.App.lookup("secret-app", create_if_missing=True, client=lm.client)
        sb = modal.Sandbox.create(
            "python",
            "-c",
            "import os; assert os.environ['A'].startswith('hunter2'); assert os.environ['NAMED']; "
            "assert os.environ['E'].startswith('hunter2')",
            app=app,
            client=lm.client,
            env={"E": SECRET + "-env"},
            secrets=[
                modal.Secret.from_dict({"A": SECRET + "-dict"}),
                modal.Secret.from_name("named"),
            ],
        )
        sb.wait()
        assert sb.returncode == 0
        sb = modal.Sandbox.create(
            "sleep",
            "60",
            app=app,
            client=lm.client,
            name="s",
            env={"E": SECRET + "-env2"},
            secrets=[modal.Secret.from_dict({"A": SECRET + "-dict2"})],
        )
        with pytest.raises(modal.exception.AlreadyExistsError) as dup:  # an error path, too
            modal.Sandbox.create("true", app=app, client=lm.client, name="s", env={"E": SECRET})
        sb.terminate()
        listing = json.dumps([r.to_dict() for r in lm.sandboxes()]) + repr(lm.sandboxes())
        on_disk = (tmp_path / "sandboxes.json").read_text()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in (listing, on_disk, logged, str(dup.value), repr(lm.registry.secrets_by_name)):
        assert SECRET not in text
    assert "named" in listing and "E" in listing  # names are recorded, values are not


def test_cli_serve_prints_ready_and_cleans_up(tmp_path: Path) -> None:
    secrets_file = tmp_path / "secrets.json"
    secrets_file.write_text(json.dumps({"cli-secret": {"CLI_KEY": "cli-value"}}))
    state = tmp_path / "state"
    proc, exports, url = start_serve(
        state, "--secrets-file", str(secrets_file), stderr=subprocess.PIPE
    )
    try:
        assert exports["MODAL_SERVER_URL"] == url
        client = make_client(url, exports["MODAL_TOKEN_ID"], exports["MODAL_TOKEN_SECRET"])
        app = modal.App.lookup("cli-app", create_if_missing=True, client=client)
        sb = modal.Sandbox.create(
            "sh",
            "-c",
            "echo $CLI_KEY; sleep 1000",
            app=app,
            client=client,
            secrets=[modal.Secret.from_name("cli-secret")],
        )
        assert next(iter(sb.stdout)) == "cli-value\n"
        (rec,) = read_listing(state / "sandboxes.json")
        assert rec.status == "running" and rec.pid and pid_alive(rec.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not pid_alive(rec.pid)
        (after,) = read_listing(state / "sandboxes.json")
        assert after.status == "terminated"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sandboxes_die_with_a_killed_server(tmp_path: Path) -> None:
    """SIGKILL gives the server no chance to clean up: PR_SET_PDEATHSIG must."""
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect_modal.local", "serve", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        exports = {}
        for line in proc.stdout:
            if line.startswith("export "):
                key, _, value = line[len("export ") :].strip().partition("=")
                exports[key] = value
            if line.startswith("READY "):
                break
        client = make_client(
            exports["MODAL_SERVER_URL"], exports["MODAL_TOKEN_ID"], exports["MODAL_TOKEN_SECRET"]
        )
        app = modal.App.lookup("orphan-app", create_if_missing=True, client=client)
        modal.Sandbox.create("sleep", "1000", app=app, client=client)
        (rec,) = read_listing(state / "sandboxes.json")
        assert rec.pid and pid_alive(rec.pid)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while pid_alive(rec.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(rec.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_is_idempotent_and_final(tmp_path: Path) -> None:
    import socket

    lm = LocalModal(state_dir=tmp_path).start()
    port = lm.port
    lm.stop()
    lm.stop()
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=2),
    ):
        pass
    with pytest.raises(RuntimeError):
        lm._call(lambda: None)


def test_default_state_dir_is_removed() -> None:
    lm = LocalModal().start()
    state = lm.state_dir
    assert (state / "sandboxes.json").exists()
    lm.stop()
    assert not state.exists()
