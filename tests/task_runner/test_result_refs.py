"""Per-step results over `max_result_bytes` travel by reference on a Modal Volume.

The sandbox writes the pickle to the volume (mounted in it), sends back a
handle, and the flow process reads the file through the Volume API; Prefect's
result record lands on the volume when the volume is the task's result storage.
"""

from __future__ import annotations

import hashlib
import random
import uuid

import pytest
from prefect import flow, task
from runner_support import sandboxes_of

from prefect_modal import ModalTaskRunner, ModalVolume
from prefect_modal.task_runner.result_refs import REF_DIR

BIG = 100 * 1024 * 1024
SEED = 1515


@task
def hundred_megabytes() -> bytes:
    return random.Random(SEED).randbytes(BIG)


@task
def ten_kilobytes() -> bytes:
    return b"r" * 10_000


@task
def small() -> str:
    return "small"


def _volume_name() -> str:
    return f"refs-{uuid.uuid4().hex[:10]}"


def test_a_100_mb_result_arrives_intact_and_its_record_is_on_the_volume(
    make_runner, credentials, modal_server
):
    block = ModalVolume(volume_name=_volume_name(), modal_credentials=credentials)
    block.save(f"refs-{uuid.uuid4().hex[:8]}")
    expected = hashlib.sha256(random.Random(SEED).randbytes(BIG)).hexdigest()

    @flow(task_runner=make_runner(), result_storage=block, persist_result=True)
    def f():
        fut = hundred_megabytes.submit()
        value = fut.result()
        return hashlib.sha256(value).hexdigest(), len(value), fut.state, str(f_id())

    digest, size, state, flow_run_id = f()
    assert (digest, size) == (expected, BIG)
    # Prefect's result record points at the volume's block, and the file is there.
    record = state.data
    assert record.metadata.storage_block_id == block._block_document_id
    key = record.metadata.storage_key
    assert block.read_bytes(key)[:1] == b"{"
    # The file in transit is gone; the sandbox had the volume mounted.
    assert [p for p in block.list(REF_DIR) if p.endswith(".pkl")] == []
    assert len(sandboxes_of(modal_server, flow_run_id)) == 1


def f_id() -> uuid.UUID:
    from prefect.context import get_run_context

    return get_run_context().flow_run.id


def test_runner_result_volume_by_name_without_result_storage(make_runner, credentials):
    name = _volume_name()

    @flow(task_runner=make_runner(max_result_bytes=2_000, result_volume=name))
    def f():
        return ten_kilobytes.submit().result(), small.submit().result()

    assert f() == (b"r" * 10_000, "small")
    block = ModalVolume(volume_name=name, modal_credentials=credentials)
    assert [p for p in block.list(REF_DIR) if p.endswith(".pkl")] == []


def test_without_a_volume_the_limit_still_fails_the_task_with_the_fix(make_runner):
    @flow(task_runner=make_runner(max_result_bytes=2_000))
    def f():
        fut = ten_kilobytes.submit()
        fut.wait()
        return [fut.state]  # in a list: a returned Failed state would fail the flow

    exc = f()[0].result(raise_on_failure=False)
    assert "over the limit of 2000 bytes" in str(exc)
    assert "result_volume=" in str(exc)


@pytest.mark.parametrize("bad", ["has space", "x" * 65, "a/b"])
def test_a_bad_result_volume_name_fails_when_the_runner_is_built(bad):
    with pytest.raises(ValueError) as info:
        ModalTaskRunner(result_volume=bad)
    assert f"result_volume={bad!r}" in str(info.value)
    assert "1 to 64 letters" in str(info.value)


def test_a_result_volume_of_another_type_is_refused():
    with pytest.raises(TypeError, match=r"result_volume=3: pass a ModalVolume block"):
        ModalTaskRunner(result_volume=3)  # type: ignore[arg-type]


def test_results_by_reference_from_one_warm_sandbox_three_calls_in_a_row(
    make_runner, credentials, modal_server
):
    """A warm sandbox keeps running after each call, so its writes must reach the volume
    while it runs: the runner's volume is created as v2 (an unversioned one is v1, whose
    sandbox writes land only when the sandbox ends: modal/volume.py, Modal's guide)."""
    import modal

    name = _volume_name()

    @flow(task_runner=make_runner(max_result_bytes=2_000, result_volume=name, max_parallelism=1))
    def f():
        values = [ten_kilobytes.submit().result() for _ in range(3)]
        return values, str(f_id())

    values, flow_run_id = f()
    assert values == [b"r" * 10_000] * 3
    assert len(sandboxes_of(modal_server, flow_run_id)) == 1  # one warm sandbox, 3 calls
    # The runner made the volume, as v2: asking for v2 is refused for a v1 volume.
    modal.Volume.from_name(name, version=2, client=modal_server.client).hydrate(
        client=modal_server.client
    )


@pytest.mark.parametrize("reuse", [True, False], ids=["warm", "per-call"])
def test_an_argument_over_the_stdin_limit_goes_by_reference(make_runner, reuse, monkeypatch):
    from prefect_modal.task_runner import call

    monkeypatch.setattr(call, "MAX_STDIN_PAYLOAD_BYTES", 1024 * 1024)
    data = random.Random(SEED).randbytes(3 * 1024 * 1024)
    name = _volume_name()

    @task
    def digest(blob: bytes) -> str:
        return hashlib.sha256(blob).hexdigest()

    @flow(task_runner=make_runner(result_volume=name, reuse_sandboxes=reuse))
    def f():
        return [digest.submit(data).result() for _ in range(2)]

    assert f() == [hashlib.sha256(data).hexdigest()] * 2


def test_an_argument_over_the_stdin_limit_without_a_volume_fails_before_any_sandbox(
    make_runner, modal_server, monkeypatch
):
    from prefect_modal.task_runner import call

    monkeypatch.setattr(call, "MAX_STDIN_PAYLOAD_BYTES", 1024 * 1024)
    data = b"x" * (2 * 1024 * 1024)

    @task
    def size(blob: bytes) -> int:
        return len(blob)

    @flow(task_runner=make_runner())
    def f():
        fut = size.submit(data)
        fut.wait()
        return [fut.state], str(f_id())

    [state], flow_run_id = f()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, call.PayloadTooLargeError)
    assert "over the 1 MiB" in str(exc) and "result_volume=" in str(exc)
    assert sandboxes_of(modal_server, flow_run_id) == []


TWENTY_MB = 20 * 1000 * 1000


@task
def twenty_megabytes() -> bytes:
    return random.Random(SEED).randbytes(TWENTY_MB)


@pytest.mark.parametrize("with_volume", [True, False], ids=["volume", "no-volume"])
def test_results_of_20_and_100_mb_with_and_without_a_result_volume(make_runner, with_volume):
    """A 20 MB result fits the output stream's default limit (32 MiB pickled: inside the
    64 MiB window the local server assumes for Modal's); 100 MB needs the volume, and
    without one fails saying the limit and the fix."""
    runner = make_runner(result_volume=_volume_name() if with_volume else None)

    @flow(task_runner=runner)
    def f():
        small_enough = twenty_megabytes.submit()
        too_big = hundred_megabytes.submit()
        for fut in (small_enough, too_big):
            fut.wait()
        return [small_enough.state, too_big.state]

    twenty, hundred = f()
    value = twenty.result()
    assert (
        hashlib.sha256(value).digest()
        == hashlib.sha256(random.Random(SEED).randbytes(TWENTY_MB)).digest()
    )
    if with_volume:
        assert len(hundred.result()) == BIG
    else:
        exc = hundred.result(raise_on_failure=False)
        assert "over the limit of 33554432 bytes" in str(exc), exc
        assert "result_volume=" in str(exc)
