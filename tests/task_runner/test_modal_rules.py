"""The adapter within Modal's rules (docs/modal-rules.md), through real flows on the local server.

Each test is a flow a user would write that fails on Modal unless the adapter
meets the rule: what the client refuses (stdin buffered past its limit), what
Modal's server answers (timeouts), what its readers do (strict UTF-8).
"""

from __future__ import annotations

import hashlib
import os
import re

import pytest
from prefect import flow, task

from prefect_modal import modal_options


def _blob(size: int) -> bytes:
    return os.urandom(1024) * (size // 1024)


@pytest.mark.parametrize(
    ("gpu", "size"),
    [
        # V1 back end (gpu=): the client buffers at most 2 MiB between drains
        ("T4", 3 * 1024 * 1024),
        # V2: at most 16 MiB (modal/io_streams.py, TASK_COMMAND_ROUTER_MAX_BUFFER_SIZE)
        (None, 24 * 1024 * 1024),
    ],
    ids=["gpu-3MiB", "cpu-24MiB"],
)
def test_an_argument_larger_than_the_clients_stdin_buffer_reaches_the_task(
    make_runner, gpu: str | None, size: int
) -> None:
    @modal_options(gpu=gpu, memory="1GiB")
    @task
    def digest(data: bytes) -> tuple[int, str]:
        return len(data), hashlib.sha256(data).hexdigest()

    data = _blob(size)

    @flow(task_runner=make_runner(reuse_sandboxes=False))
    def f() -> tuple[int, str]:
        return digest.submit(data).result()

    assert f() == (len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("reuse", [True, False], ids=["warm", "per-call"])
def test_a_sandbox_that_reaches_its_timeout_fails_the_task_naming_the_limit(
    make_runner, reuse: bool
) -> None:
    """Modal ends it with a timeout, and ``wait()`` raises SandboxTimeoutError even with
    ``raise_on_termination=False`` (modal/sandbox/_common.py, raise_for_wait_result)."""

    @modal_options(timeout=3)
    @task
    def sleeps() -> str:
        import time

        print("going to sleep")
        time.sleep(120)
        return "woke"

    @flow(task_runner=make_runner(reuse_sandboxes=reuse))
    def f() -> object:
        return sleeps.submit().result(raise_on_failure=False)

    error = f()
    assert isinstance(error, TimeoutError), error
    assert "timed out after 3 s" in str(error)
    assert "going to sleep" in str(error)  # its last lines come along


def test_tag_values_follow_modals_rule_and_the_artifact_keeps_the_name(
    make_runner, modal_server
) -> None:
    """Tag values are 1-63 of [A-Za-z0-9._-] (modal/_utils/name_utils.py, check_tag_dict);
    a task's name may hold spaces and more."""
    from prefect.runtime import flow_run
    from runner_support import sandboxes_of

    from prefect_modal.core import tags
    from prefect_modal.core.artifacts import read_sandbox_artifacts

    name = "Träin the model: step #1 " + "x" * 80

    @task(name=name)
    def named() -> str:
        return "ok"

    @flow(task_runner=make_runner(reuse_sandboxes=False))
    def f() -> str:
        named.submit().result()
        return flow_run.get_id()

    run_id = f()
    [record] = sandboxes_of(modal_server, run_id)
    value = record.tags[tags.TASK_NAME]
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,63}", value), value
    assert value.startswith("Tr-in-the-model-step-1-x")
    [artifact] = [a for a in read_sandbox_artifacts(run_id) if a.task_name]
    assert artifact.task_name == name


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("ModalWorker 6f1e-7a", "ModalWorker-6f1e-7a"),
        ("  ", "-"),
        ("a" * 70, "a" * 63),
        ("ok.name_1-2", "ok.name_1-2"),
    ],
)
def test_tag_value(text: str, tag: str) -> None:
    from prefect_modal.core.tags import tag_value

    assert tag_value(text) == tag


@pytest.mark.parametrize("reuse", [True, False], ids=["warm", "per-call"])
def test_stderr_that_is_not_utf8_reaches_the_log_with_replacement_characters(
    make_runner, reuse: bool
) -> None:
    """Modal's text readers decode strictly (modal/io_streams.py, errors="strict"): bytes
    that are not UTF-8 must not fail the call."""
    from prefect.runtime import flow_run

    @task
    def noisy() -> str:
        import sys

        sys.stderr.buffer.write(b"before \xff\xfe bytes after\n")
        sys.stderr.flush()
        print("still talking")
        return "done"

    @flow(task_runner=make_runner(reuse_sandboxes=reuse))
    def f() -> tuple[str, str]:
        return noisy.submit().result(), flow_run.get_id()

    value, run_id = f()
    assert value == "done"
    messages = _flow_run_log_messages(run_id)
    assert any("before \ufffd\ufffd bytes after" in m for m in messages), messages
    assert any("still talking" in m for m in messages)


def _flow_run_log_messages(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from waiting import wait_for

    def read() -> list[str]:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
        return [log.message for log in logs]

    return wait_for(lambda: [m for m in read() if "still talking" in m] and read(), 20, "logs")


def test_a_module_whose_distribution_has_another_name_is_installed(make_runner) -> None:
    """`_pytest` comes from the distribution `pytest`, as
    importlib.metadata.packages_distributions() maps it; a module global (`pytest`
    itself, pickled by cloudpickle's subimport) counts as much as a function of it."""
    import _pytest.outcomes

    @task
    def uses_pytest() -> str:
        return f"{pytest.__name__}:{_pytest.outcomes.__name__}"

    @flow(task_runner=make_runner(reuse_sandboxes=False))
    def f() -> str:
        return uses_pytest.submit().result()

    assert f() == "pytest:_pytest.outcomes"


@pytest.fixture
def throttled(tmp_path, prefect_api):
    """A local server throttled to 2 sandbox creates a second (off by default: Modal
    publishes no rate), and a runner factory pointed at it."""
    from prefect_modal import ModalCredentials, ModalTaskRunner
    from prefect_modal.local import LocalModal
    from prefect_modal.local.limits import Limits

    with LocalModal(state_dir=tmp_path / "throttled", limits=Limits(create_rate=2)) as lm:
        credentials = ModalCredentials(
            token_id=lm.env["MODAL_TOKEN_ID"],
            token_secret=lm.env["MODAL_TOKEN_SECRET"],
            server_url=lm.url,
        )
        yield lambda **kw: ModalTaskRunner(credentials=credentials, **kw)


def test_twenty_tasks_under_a_two_per_second_create_throttle_all_complete(throttled, caplog):
    """Modal answers a create over the rate with ResourceExhaustedError ("Sandbox creation
    rate limit exceeded"), which its client does not retry: the adapter does."""
    import logging

    caplog.set_level(logging.INFO, logger="prefect_modal.sandboxes")

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow(task_runner=throttled(reuse_sandboxes=False, max_parallelism=8))
    def f() -> list[int]:
        return double.map(range(20)).result()

    assert f() == [2 * x for x in range(20)]
    refusals = [r for r in caplog.records if "refused a sandbox for capacity" in r.message]
    assert refusals and "Sandbox creation rate limit exceeded" in refusals[0].getMessage()


def test_a_create_refused_past_the_bound_fails_with_modals_message_and_the_bound(
    throttled, monkeypatch
):
    from prefect_modal.core import modal_api

    monkeypatch.setattr(modal_api, "CREATE_RETRY_SECONDS", 1.0)

    @task
    def one(x: int) -> int:
        return x

    @flow(task_runner=throttled(reuse_sandboxes=False, max_parallelism=8))
    def f() -> list[object]:
        futures = one.map(range(8))
        futures.wait()
        return [fut.state.result(raise_on_failure=False) for fut in futures]

    outcomes = f()
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors, outcomes  # 8 creates at once against a bucket of 2
    assert all(isinstance(e, modal_api.SandboxCapacityError) for e in errors), errors
    text = str(errors[0])
    assert "Sandbox creation rate limit exceeded" in text and "over 1 s" in text
