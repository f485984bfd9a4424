"""ModalTaskRunner against the local Modal server: outcomes, semantics Prefect keeps, options."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task
from prefect.cache_policies import INPUTS
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.states import StateType
from pydantic import ValidationError
from runner_helpers import scale
from runner_support import sandboxes_of, wait_until

from prefect_modal import SandboxSpec, modal_options
from prefect_modal.task_runner import call as sandbox_call
from prefect_modal.task_runner import pickling


@task
def add(x: int, y: int) -> int:
    print(f"adding {x} and {y}")
    return x + y


@task
def where() -> dict:
    return {"pid": os.getpid(), "sandbox": os.environ.get("MODAL_SANDBOX_ID")}


def flow_run_id() -> str:
    return str(get_run_context().flow_run.id)


def test_success_runs_in_a_sandbox(make_runner, modal_server):
    # per-call sandboxes and their names (warm ones: test_warm_sandboxes.py)
    @flow(task_runner=make_runner(reuse_sandboxes=False))
    def f():
        return add.submit(1, 2).result(), where.submit().result(), flow_run_id()

    total, info, run_id = f()
    assert total == 3
    assert info["pid"] != os.getpid() and info["sandbox"].startswith("sb-")
    records = sandboxes_of(modal_server, run_id)
    assert len(records) == 2 and {r.status for r in records} == {"exited"}
    assert info["sandbox"] in {r.id for r in records}
    names = {r.name for r in records}
    assert all(
        n.startswith(f"pf-{run_id.replace('-', '')[:8]}-") and n.endswith("-1") for n in names
    )


def test_failure_keeps_type_and_remote_traceback(make_runner):
    @task
    def explode(n: int) -> None:
        def inner_helper_that_raises():
            raise ValueError(f"bad input {n}")

        inner_helper_that_raises()

    @flow(task_runner=make_runner())
    def g():
        fut = explode.submit(7)
        fut.wait()
        return [fut.state]

    (state,) = g()
    assert state.is_failed()
    assert "ValueError: bad input 7" in state.message
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, ValueError) and str(exc) == "bad input 7"
    notes = "\n".join(getattr(exc, "__notes__", []))
    assert "Remote traceback (Modal sandbox sb-" in notes
    assert "inner_helper_that_raises" in notes


def test_retries_start_one_sandbox_per_attempt(make_runner, modal_server, tmp_path: Path):
    # each attempt is a sandbox of its own, with its own files: they count on a volume
    counter = "/state/attempts"
    volume = f"attempts-{tmp_path.name}"[:60]

    @task(retries=2, retry_delay_seconds=0)
    def flaky(path: str) -> int:
        p = Path(path)
        n = int(p.read_text()) + 1 if p.exists() else 1
        p.write_text(str(n))
        if n < 3:
            raise RuntimeError(f"attempt {n} fails")
        return n

    # about fresh sandboxes per attempt; with warm sandboxes (the default) a retry
    # after a raise runs on the same warm sandbox (test_warm_sandboxes.py)
    @flow(
        task_runner=make_runner(spec=SandboxSpec(volumes={"/state": volume}), reuse_sandboxes=False)
    )
    def f():
        return flaky.submit(counter).result(), flow_run_id()

    attempts, run_id = f()
    assert attempts == 3
    records = sandboxes_of(modal_server, run_id)
    assert sorted(r.tags["prefect.attempt"] for r in records) == ["1", "2", "3"]
    assert len({r.tags["prefect.task-run-id"] for r in records}) == 1
    assert len({r.name for r in records}) == 3
    assert [r.returncode for r in sorted(records, key=lambda r: r.created_at)] == [1, 1, 0]


def test_cache_hit_starts_no_sandbox(make_runner, modal_server, tmp_path: Path):
    token = tmp_path.name  # unique per test run, so the first call is a miss

    @task(cache_policy=INPUTS, persist_result=True)
    def expensive(key: str) -> str:
        return f"computed {key} in {os.environ.get('MODAL_SANDBOX_ID')}"

    @flow(task_runner=make_runner())
    def f():
        return expensive.submit(token).result(), flow_run_id()

    first, run1 = f()
    second, run2 = f()
    assert first == second and "sb-" in first
    assert len(sandboxes_of(modal_server, run1)) == 1
    assert sandboxes_of(modal_server, run2) == []


def test_timeout_terminates_the_sandbox(make_runner, modal_server):
    @task(timeout_seconds=1)
    def slow() -> None:
        print("going to sleep", flush=True)
        time.sleep(60)

    @flow(task_runner=make_runner())
    def f():
        fut = slow.submit()
        fut.wait()
        return fut.state, flow_run_id()

    started = time.monotonic()
    state, run_id = f()
    assert time.monotonic() - started < 15
    assert state.is_failed() and state.name == "TimedOut"
    assert "timeout" in state.message.lower()
    assert isinstance(state.result(raise_on_failure=False), TimeoutError)
    (record,) = wait_until(
        lambda: [r for r in sandboxes_of(modal_server, run_id) if r.status != "running"]
    )
    assert record.status == "terminated" and record.returncode == 137


def test_sandbox_killed_from_outside_fails_with_exit_code(make_runner, modal_server):
    from prefect_modal.core import modal_api

    @task
    def victim() -> None:
        print("last words before the kill", flush=True)
        time.sleep(60)

    run_ids: list[str] = []

    def killer() -> None:
        records = wait_until(
            lambda: [
                r
                for r in modal_server.sandboxes()
                if r.tags.get("prefect.flow-run-id") in run_ids and r.status == "running"
            ],
            timeout=30,
        )
        time.sleep(0.5)  # let the last words reach the runner
        modal_api.terminate_by_id(records[0].id, modal_server.client)

    @flow(task_runner=make_runner())
    def f():
        run_ids.append(flow_run_id())
        fut = victim.submit()
        fut.wait()
        return [fut.state]

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    (state,) = f()
    thread.join(5)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, sandbox_call.SandboxCrashedError)
    assert "exit code 137" in str(exc) and "last words before the kill" in str(exc)


def test_options_reach_the_server(make_runner, modal_server):
    @modal_options(gpu="t4", cpu=2, memory="1GiB")
    @task
    def decorated() -> str:
        return "ok"

    @task
    def plain() -> str:
        return "ok"

    bound = modal_options(gpu="A100:2", memory=3000)(plain)

    @flow(task_runner=make_runner(spec=SandboxSpec(cpu=0.5, memory=512)))
    def f():
        a = decorated.submit()
        b = bound.submit()
        with modal_options(cpu=4):
            c = plain.submit()
        d = plain.submit()
        return [x.result() for x in (a, b, c, d)], flow_run_id()

    results, run_id = f()
    assert results == ["ok"] * 4
    seen = sorted(
        ((r.gpu, r.cpu, r.memory_mib) for r in sandboxes_of(modal_server, run_id)), key=str
    )
    assert seen == sorted(
        [
            ("T4", 2.0, 1024),  # decorator over the runner spec
            ("A100:2", 0.5, 3000),  # bound copy keeps the runner's cpu
            (None, 4.0, 512),  # `with` block
            (None, 0.5, 512),  # runner spec alone
        ],
        key=str,
    )


def test_bad_spec_values_fail_before_any_sandbox(make_runner, modal_server):
    with pytest.raises(ValidationError, match="Z80"):
        modal_options(gpu="Z80")
    with pytest.raises(ValidationError, match="memory"):
        make_runner(spec=SandboxSpec(memory="lots"))

    seen: list[str] = []

    @flow(task_runner=make_runner())
    def f():
        seen.append(flow_run_id())
        with modal_options(cpu=-1):
            add.submit(1, 2)

    state = f(return_state=True)
    assert state.is_failed() and "cpu=-1" in state.message
    assert sandboxes_of(modal_server, seen[0]) == []


def test_max_parallelism_is_respected(make_runner, modal_server):
    @task
    def nap(i: int) -> int:
        time.sleep(0.4)
        return i

    peak = [0]
    run_ids: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            running = [
                r
                for r in modal_server.sandboxes()
                if r.tags.get("prefect.flow-run-id") in run_ids and r.status == "running"
            ]
            peak[0] = max(peak[0], len(running))
            time.sleep(0.01)

    @flow(task_runner=make_runner(max_parallelism=3))
    def f():
        run_ids.append(flow_run_id())
        return nap.map(range(9)).result()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        assert f() == list(range(9))
    finally:
        stop.set()
        sampler.join(5)
    assert 2 <= peak[0] <= 3
    # warm sandboxes (the default): the nine calls share the (at most) three sandboxes
    assert 2 <= len(sandboxes_of(modal_server, run_ids[0])) <= 3


def test_map_of_200_tasks_completes(make_runner, modal_server):
    @task
    def square(i: int) -> int:
        return i * i

    @flow(task_runner=make_runner(max_parallelism=32))
    def f():
        return sum(square.map(range(200)).result()), flow_run_id()

    total, run_id = f()
    assert total == sum(i * i for i in range(200))
    records = sandboxes_of(modal_server, run_id)
    # warm sandboxes: at most max_parallelism of them, each ended normally with the run
    assert 1 <= len(records) <= 32 and all(r.returncode == 0 for r in records)


def test_lineage_is_recorded(make_runner):
    @flow(task_runner=make_runner())
    def f():
        a = add.submit(1, 2)
        b = add.submit(a, 10)
        return a.task_run_id, b.task_run_id, b.result()

    a_id, b_id, total = f()
    assert total == 13

    def recorded() -> Any:
        # task runs reach the API as events, recorded by the server after the fact
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                run = client.read_task_run(b_id)
            except ObjectNotFound:
                return None
        return run if run.task_inputs.get("x") else None

    run = wait_until(recorded, timeout=30, what=f"task run {b_id} recorded with its inputs")
    upstream = {str(i.id) for i in run.task_inputs["x"]}
    assert upstream == {str(a_id)}


def test_async_task_runs_remotely(make_runner):
    @task
    async def fetch(x: int) -> dict:
        await asyncio.sleep(0.01)
        return {"x": x, "pid": os.getpid()}

    @flow(task_runner=make_runner())
    def f():
        return fetch.submit(5).result()

    out = f()
    assert out["x"] == 5 and out["pid"] != os.getpid()


def test_local_helper_module_travels_by_value(make_runner):
    @task
    def use_helper(x: int) -> dict:
        return scale(x, factor=3)

    @flow(task_runner=make_runner())
    def f():
        return use_helper.submit(4).result(), task(scale).submit(2).result()

    nested, direct = f()
    assert nested["value"] == 12 and nested["pid"] != os.getpid()
    assert direct["value"] == 20


def test_remote_interrupts_crash_the_task_not_the_flow(make_runner):
    @task
    def interrupt(kind: str) -> None:
        if kind == "ki":
            raise KeyboardInterrupt
        raise SystemExit(3)

    @flow(task_runner=make_runner())
    def f():
        a, b, c = interrupt.submit("ki"), interrupt.submit("exit"), add.submit(2, 2)
        a.wait()
        b.wait()
        return a.state, b.state, c.result()

    a, b, total = f()
    assert total == 4
    assert a.type == StateType.CRASHED and "interrupt signal" in a.message
    assert b.type == StateType.CRASHED and "system exit" in b.message


def test_hybrid_local_and_remote(make_runner):
    @modal_options(local=False)
    @task
    def gpu_step() -> int:
        return os.getpid()

    @flow(task_runner=make_runner(default_local=True))
    def mostly_local():
        return where.submit().result()["pid"], gpu_step.submit().result()

    local_pid, remote_pid = mostly_local()
    assert local_pid == os.getpid() and remote_pid != os.getpid()

    @flow(task_runner=make_runner())
    def mostly_remote():
        with modal_options(local=True):
            here = where.submit()
        return here.result()["pid"], where.submit().result()["pid"]

    here, there = mostly_remote()
    assert here == os.getpid() and there != os.getpid()


def test_result_over_the_limit_points_to_storage(make_runner):
    @task
    def big() -> bytes:
        return b"x" * 10_000

    @flow(task_runner=make_runner(max_result_bytes=2_000))
    def f():
        fut = big.submit()
        fut.wait()
        return [fut.state]

    exc = f()[0].result(raise_on_failure=False)
    assert isinstance(exc, sandbox_call.ResultTooLargeError)
    assert "max_result_bytes" in str(exc) and "volume" in str(exc)


def test_python_version_mismatch_is_reported(make_runner, monkeypatch):
    # The local server runs this venv's Python; pretend the flow runs another one.
    monkeypatch.setattr(sandbox_call, "LOCAL_PYTHON", "3.99")

    @flow(task_runner=make_runner())
    def f():
        fut = add.submit(1, 1)
        fut.wait()
        return [fut.state]

    exc = f()[0].result(raise_on_failure=False)
    assert isinstance(exc, sandbox_call.PythonVersionMismatchError)
    assert "Python 3.99" in str(exc) and "the sandbox runs Python 3." in str(exc)


def test_an_attempt_already_running_is_followed_not_started_twice(
    make_runner, modal_server, monkeypatch
):
    """A restarted flow process finds its attempt's sandbox by name and reads its outcome."""
    import uuid

    import cloudpickle

    from prefect_modal.core import modal_api
    from prefect_modal.task_runner import remote
    from prefect_modal.task_runner import runner as task_runner_module

    task_run_id = uuid.uuid4()
    monkeypatch.setattr(task_runner_module, "_new_task_run_id", lambda: task_run_id)

    def earlier_process_call() -> str:
        time.sleep(3)  # still running when the "restarted" process submits
        return "result of the earlier process"

    @task
    def answer() -> str:
        return "result of a second start"

    @flow(task_runner=make_runner(reuse_sandboxes=False))
    def f():
        run_id = get_run_context().flow_run.id
        info = sandbox_call.CallInfo(
            task_run_id=task_run_id, flow_run_id=run_id, task_name="answer", attempt=1
        )
        spec = SandboxSpec()
        app, image = modal_api.prepare(spec, modal_server.client)
        earlier = modal_api.create_sandbox(
            spec,
            sandbox_call.bootstrap_command(),
            client=modal_server.client,
            name=info.sandbox_name,
            tags=info.tags,
            app=app,
            image=image,
        )
        payload = cloudpickle.dumps((earlier_process_call, (), {}))
        header = remote.make_header("earliernonce", len(payload), sandbox_call.LOCAL_PYTHON, 10**6)
        modal_api.send_stdin(earlier, header + payload)
        return answer.submit().result(), str(run_id)

    result, run_id = f()
    assert result == "result of the earlier process"
    records = sandboxes_of(modal_server, run_id)
    assert len(records) == 1 and records[0].tags["prefect.task-run-id"] == str(task_run_id)


def test_registry_image_reaches_the_server(make_runner, modal_server):
    @modal_options(image="python:3.11-slim", pip_packages=["cloudpickle"])
    @task
    def in_image() -> int:
        return 1

    @flow(task_runner=make_runner())
    def f():
        return in_image.submit().result(), flow_run_id()

    value, run_id = f()
    (record,) = sandboxes_of(modal_server, run_id)
    assert value == 1 and "python:3.11-slim" in record.image


def test_generator_task_runs_in_the_flow_process(make_runner):
    @task
    def numbers():
        yield os.getpid()
        yield os.getpid()

    @flow(task_runner=make_runner())
    def f():
        return list(numbers.submit().result())

    assert f() == [os.getpid(), os.getpid()]


def _reimport_pathlib() -> str:
    """Imports `pathlib` afresh: `ntpath` probes for `nt` during that import."""
    import sys

    for name in ("pathlib", "ntpath"):
        sys.modules.pop(name, None)
    import pathlib

    return pathlib.PurePosixPath("a/b").name


def test_an_import_probe_inside_another_import_loads_no_pth_files(modal_server):
    """The bootstrap runs `python -S` and loads `.pth` files on the first import that
    misses; a probe missing inside another module's import (here `nt`, while
    `pathlib` imports) must not run them against the half-imported module.  An
    editable install's `.pth` imports pathlib: that is what broke."""
    import importlib.metadata

    import modal

    from prefect_modal.task_runner import remote

    # An image whose environment has a `.pth` file with an import line, as an
    # editable install's has.
    image = (
        modal.Image.debian_slim(python_version=sandbox_call.LOCAL_PYTHON)
        .pip_install(f"cloudpickle=={importlib.metadata.version('cloudpickle')}")
        .run_commands(
            'python -c "import site; '
            "open(site.getsitepackages()[0] + '/probe.pth', 'w').write('import pathlib\\n')\""
        )
    )
    app = modal.App.lookup("pth-probe", create_if_missing=True, client=modal_server.client)
    nonce = "probe"
    payload = pickling.dumps_call(_reimport_pathlib, (), {})
    header = remote.make_header(nonce, len(payload), sandbox_call.LOCAL_PYTHON, 1 << 20)
    for _ in range(3):  # the first may start as a fresh process, the next are forked
        sb = modal.Sandbox.create(
            *sandbox_call.bootstrap_command(), app=app, image=image, client=modal_server.client
        )
        sb.stdin.write(header + payload)
        sb.stdin.write_eof()
        sb.stdin.drain()
        sb.wait()
        err, out = sb.stderr.read(), sb.stdout.read()
        assert "Error processing line" not in err and "Traceback" not in err, err
        frames = dict(remote.decode_frames(nonce, out))
        assert sb.returncode == 0 and "OK" in frames, (sb.returncode, err)


def test_a_mapped_result_passed_on_arrives_as_a_plain_list(make_runner):
    """Prefect hands a resolved `task.map` result on as a PrefectFutureList; the sandbox
    gets a plain list and never has to import Prefect (Modal's default image has none)."""

    @task
    def combine(parts: list[int]) -> tuple[str, bool, list[int]]:
        import sys

        return type(parts).__qualname__, "prefect" in sys.modules, list(parts)

    @flow(task_runner=make_runner())
    def f():
        return combine.submit(add.map([1, 2], [10, 20])).result()

    assert f() == ("list", False, [11, 22])


def test_plain_containers():
    from collections import namedtuple

    from prefect.futures import PrefectFutureList

    Point = namedtuple("Point", "x y")
    point = Point(1, 2)
    mapped = PrefectFutureList([1, 2])
    nested = {"a": [mapped, (mapped,)], "p": point}
    out = pickling.plain_containers(nested)
    assert out == {"a": [[1, 2], ([1, 2],)], "p": point}
    assert type(out["a"][0]) is list and type(out["a"][1][0]) is list
    assert out["p"] is point  # the user's own tuple subclass stays what it is
    plain = {"k": [1, "x", (2.0, None)]}
    assert pickling.plain_containers(plain) is plain  # nothing to change: no copy
    loop: list[object] = [1]
    loop.append(loop)
    assert pickling.plain_containers(loop) is loop
