"""`@modal(work_pool=...)`: a called flow runs whole in one sandbox and its value comes back.

The caller is this test process (as a laptop or notebook would be), talking to
the real Prefect server and the local Modal server the worker tests share; no
bucket anywhere: the bundle goes in on the sandbox's stdin and the value comes
back through the `ModalVolume` result storage.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from worker_helpers import FLOWS_DIR, ModalServer, PrefectServer, create_pool, pid_alive

from prefect_modal.core import tags
from prefect_modal.decorators import modal as modal_infra
from prefect_modal.storage import DEFAULT_RESULTS_VOLUME, ModalVolume
from prefect_modal.worker.adhoc import FlowNotBundleable, WorkPoolNotFound, WrongWorkPoolType

pytestmark = pytest.mark.slow

POOL = "modal-adhoc"


@modal_infra(work_pool=POOL)
@flow
def add(x: int, y: int) -> int:
    print("ADHOC-PRINT adding", flush=True)
    return x + y


@modal_infra(work_pool=POOL)
@flow
def fails() -> None:
    raise ValueError("ADHOC-BOOM-MARKER")


@modal_infra(work_pool=POOL, cpu=1.5, memory="768MiB", gpu="T4")
@flow
def sized() -> str:
    return "sized"


@pytest.fixture
def caller(
    api: Any,
    prefect_server: PrefectServer,
    modal_server: ModalServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Any]:
    """This process as the caller: Prefect's API and the local Modal server's token."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    for key, value in modal_server.env.items():
        monkeypatch.setenv(key, value)
    create_pool(api, POOL, {"cpu": 1.0, "memory": "1GiB"})
    # Prefect's log and event services run in threads of their own, which do not see
    # temporary settings: the sandbox's lines reaching the run are the pipeline
    # tests' business, here they would go to an ephemeral server.
    with temporary_settings(
        updates={PREFECT_API_URL: prefect_server.url, PREFECT_LOGGING_TO_API_ENABLED: False}
    ):
        yield api


def _run_id(state: Any) -> UUID:
    return state.state_details.flow_run_id


def _assert_nothing_running(modal_server: ModalServer, run_id: UUID) -> None:
    for record in modal_server.for_run(run_id):
        assert record.status != "running", record
        assert record.pid is None or not pid_alive(record.pid), record


def test_called_flow_returns_its_value_through_the_volume(
    caller: Any, modal_server: ModalServer
) -> None:
    state = add(1, 2, return_state=True)
    assert state.is_completed(), state
    assert state.result() == 3
    run_id = _run_id(state)
    [record] = modal_server.for_run(run_id)
    assert record.tags[tags.FLOW_RUN] == str(run_id)
    # The pool's cpu/memory, and the result volume mounted in the sandbox.
    assert record.cpu == 1.0 and record.memory_mib == 1024
    assert DEFAULT_RESULTS_VOLUME in record.volumes.values()
    # The value itself, called the plain way.
    assert add(20, 22) == 42
    _assert_nothing_running(modal_server, run_id)


def test_submit_returns_a_future_whose_result_is_the_value(
    caller: Any, modal_server: ModalServer
) -> None:
    future = add.submit(5, 6)
    assert future.result() == 11
    assert future.state.is_completed()
    _assert_nothing_running(modal_server, future.flow_run_id)


def test_a_failing_flow_raises_its_exception_at_the_caller(
    caller: Any, modal_server: ModalServer
) -> None:
    with pytest.raises(ValueError, match="ADHOC-BOOM-MARKER"):
        fails()
    state = fails(return_state=True)
    assert state.is_failed(), state
    _assert_nothing_running(modal_server, _run_id(state))


def test_decorator_job_variables_reach_the_sandbox(caller: Any, modal_server: ModalServer) -> None:
    state = sized(return_state=True)
    assert state.result() == "sized"
    [record] = modal_server.for_run(_run_id(state))
    assert record.cpu == 1.5
    assert record.memory_mib == 768
    assert record.gpu == "T4"


def test_a_missing_pool_says_how_to_create_it(caller: Any, modal_server: ModalServer) -> None:
    before = len(modal_server.sandboxes())

    @modal_infra(work_pool="no-such-modal-pool")
    @flow
    def lonely() -> int:
        return 1

    with pytest.raises(WorkPoolNotFound) as err:
        lonely()
    assert "prefect work-pool create no-such-modal-pool --type modal" in str(err.value)
    from prefect.exceptions import ObjectNotFound

    with pytest.raises(ObjectNotFound):  # and the call did not create it
        caller.read_work_pool("no-such-modal-pool")
    assert len(modal_server.sandboxes()) == before


def test_a_pool_of_another_type_is_refused(caller: Any, modal_server: ModalServer) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    try:
        caller.create_work_pool(WorkPoolCreate(name="a-process-pool", type="process"))
    except ObjectAlreadyExists:
        pass
    before = len(modal_server.sandboxes())

    @modal_infra(work_pool="a-process-pool")
    @flow
    def elsewhere() -> int:
        return 1

    with pytest.raises(WrongWorkPoolType) as err:
        elsewhere()
    message = str(err.value)
    assert "'a-process-pool' is of type 'process'" in message
    assert "prefect work-pool create a-process-pool-modal --type modal" in message
    assert len(modal_server.sandboxes()) == before


def test_a_bad_job_variable_fails_before_any_run(caller: Any, modal_server: ModalServer) -> None:
    before = len(modal_server.sandboxes())

    @modal_infra(work_pool=POOL, memory="lots")
    @flow
    def greedy() -> int:
        return 1

    with pytest.raises(ValueError, match="memory") as err:
        greedy()
    assert "lots" in str(err.value)
    assert len(modal_server.sandboxes()) == before


_LOCK = threading.Lock()


@modal_infra(work_pool=POOL)
@flow
def holds_a_lock() -> bool:
    return _LOCK.locked()


def test_a_flow_that_cannot_be_bundled_says_why_and_what_to_do(
    caller: Any, modal_server: ModalServer
) -> None:
    before = len(modal_server.sandboxes())
    with pytest.raises(FlowNotBundleable) as err:
        holds_a_lock()
    message = str(err.value)
    assert "cannot be bundled" in message and "lock" in message
    assert "prefect deploy" in message and "test_adhoc.py:holds_a_lock" in message
    assert len(modal_server.sandboxes()) == before


def test_an_image_without_prefect_or_with_another_minor_says_how_to_fix_it(
    caller: Any, modal_server: ModalServer
) -> None:
    """The sandbox's Python finds a fake `prefect` first (through PYTHONPATH, a folder
    the local server shows the sandbox): missing, then of another minor version."""
    import prefect

    for folder, expected in (
        ("no_prefect", "has no Prefect"),
        ("old_prefect", "has prefect 2.20.0 but the caller runs prefect " + prefect.__version__),
    ):

        @modal_infra(work_pool=POOL, env={"PYTHONPATH": str(FLOWS_DIR / "fake_images" / folder)})
        @flow
        def probe() -> int:
            return 1

        state = probe(return_state=True)
        assert state.is_crashed(), state
        assert expected in state.message, state.message
        assert "pip_packages=['prefect==" in state.message, state.message
        assert "78" in state.message
        _assert_nothing_running(modal_server, _run_id(state))


# -- the block ------------------------------------------------------------------------


def test_volume_block_round_trips_bytes_and_a_prefect_result(
    caller: Any, modal_server: ModalServer
) -> None:
    import anyio
    from prefect.results import ResultStore

    block = ModalVolume(volume_name="adhoc-block-test", base_path="runs")
    data = bytes(range(256)) * 1000
    assert block.write_bytes("a/b.bin", data) == "/runs/a/b.bin"
    assert block.read_bytes("/a/b.bin") == data
    assert block.list("a") == ["a/b.bin"]
    with pytest.raises(FileNotFoundError, match="adhoc-block-test"):
        block.read_bytes("missing.bin")
    with pytest.raises(ValueError, match=r"\.\."):
        block.read_bytes("../escape")
    block.remove("a", recursive=True)
    assert block.list("") == []

    block.save("adhoc-block-test", overwrite=True)
    store = ResultStore(result_storage=block)

    async def round_trip() -> Any:
        record = store.create_result_record({"answer": 42}, key="answer-key")
        await store.apersist_result_record(record)
        return await store.aread("answer-key")

    assert anyio.run(round_trip).result == {"answer": 42}
    assert b"answer" in block.read_bytes("answer-key")


def test_volume_block_refuses_a_bad_name() -> None:
    with pytest.raises(ValueError, match=r"volume_name='no/slash'"):
        ModalVolume(volume_name="no/slash")
