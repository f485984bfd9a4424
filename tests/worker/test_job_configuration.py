"""The job configuration, env split, naming and log forwarding, without servers (fast)."""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any
from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun
from pydantic import ValidationError

from prefect_modal.core.spec import SandboxSpec
from prefect_modal.worker.reconcile import SandboxLogForwarder, crash_message
from prefect_modal.worker.worker import (
    PER_STEP_COMMAND,
    PIPELINE_COMMAND,
    ModalWorker,
    ModalWorkerJobConfiguration,
    is_secret_env,
    sandbox_name_for,
    split_env,
)


def test_default_template_has_every_spec_field_described() -> None:
    template = ModalWorker.get_default_base_job_template()
    props = template["variables"]["properties"]
    expected = set(SandboxSpec.model_fields) - {"env"} | {
        "env",
        "command",
        "name",
        "labels",
        "mode",
        "max_parallelism",
        "task_specs",
        "stream_output",
        "cancel_grace_seconds",
        "modal_credentials",
    }
    assert expected <= set(props)
    assert all(props[k].get("description") for k in props), [
        k for k in props if not props[k].get("description")
    ]
    assert props["mode"]["default"] == "pipeline" and props["stream_output"]["default"] is True
    assert set(template["job_configuration"]) == set(props)
    assert ModalWorker.type == "modal"


@pytest.mark.parametrize(
    ("values", "field", "fragment"),
    [
        ({"memory": "lots"}, "memory", "not a size"),
        ({"gpu": "Z100"}, "gpu", "not a GPU type"),
        ({"cpu": -1}, "cpu", "above 0"),
        ({"timeout": 999_999}, "timeout", "24 h"),
        ({"workdir": "relative"}, "workdir", "absolute"),
        ({"registry_secret": "creds"}, "registry_secret", "image"),
        ({"max_parallelism": 0}, "max_parallelism", "1 or more"),
        (
            {"mode": "per_step", "task_specs": {"t": {"memory": "x"}}},
            "task_specs['t'].memory",
            "size",
        ),
    ],
)
def test_bad_values_name_the_job_variable(
    values: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(ValidationError) as info:
        ModalWorkerJobConfiguration(**values)
    message = str(info.value)
    assert f"Invalid job variable {field}" in message or f"'{field}'" in message, message
    assert fragment in message


def test_pipeline_mode_refuses_per_task_image_settings_suggesting_per_step() -> None:
    with pytest.raises(ValidationError, match="per_step") as info:
        ModalWorkerJobConfiguration(task_specs={"train": {"image": "x:1", "gpu": "A100"}})
    assert "task_specs['train'].image" in str(info.value)
    config = ModalWorkerJobConfiguration(mode="per_step", task_specs={"train": {"gpu": "a100"}})
    assert config.per_task_specs["train"].gpu_config == "A100"


def test_spec_normalised_and_flow_sandbox_spec() -> None:
    config = ModalWorkerJobConfiguration(memory="2GiB", gpu="a100", gpu_count=2, cpu=1)
    assert config.spec.memory == 2048 and config.spec.gpu_config == "A100:2"
    flow_spec = config.sandbox_spec()
    # prefect and its dependencies at the worker's versions; no prefect-modal (pipeline)
    pins = flow_spec.pip_packages or []
    assert f"prefect=={importlib.metadata.version('prefect')}" in pins
    assert f"pydantic=={importlib.metadata.version('pydantic')}" in pins
    assert not any(p.lower().startswith(("prefect-modal", "prefect_modal")) for p in pins)
    assert not flow_spec.local_python_sources
    per_step = ModalWorkerJobConfiguration(mode="per_step", gpu="A100").sandbox_spec()
    assert per_step.gpu_config is None  # the GPU is for the task sandboxes
    # per_step: prefect_modal as local source (not on PyPI), its dependencies pinned
    assert per_step.local_python_sources == ["prefect_modal"]
    assert f"modal=={importlib.metadata.version('modal')}" in (per_step.pip_packages or [])


def _flow_run() -> FlowRun:
    return FlowRun(id=uuid4(), name="brave-otter", flow_id=uuid4())


def test_prepare_sets_name_command_and_prefect_env() -> None:
    run = _flow_run()
    config = ModalWorkerJobConfiguration(env={"A": "1"})
    config.prepare_for_flow_run(run)
    assert config.name == f"prefect-{run.id}"
    assert config.command == PIPELINE_COMMAND
    assert config.env["PREFECT__FLOW_RUN_ID"] == str(run.id) and config.env["A"] == "1"

    templated = ModalWorkerJobConfiguration(name="{{ ctx.flow_run.name }}", mode="per_step")
    templated.prepare_for_flow_run(run)
    assert templated.name == f"brave-otter-{run.id}"
    assert templated.command == PER_STEP_COMMAND


def test_sandbox_names_are_modal_safe_and_keep_the_run_id() -> None:
    run_id = uuid4()
    assert sandbox_name_for(None, run_id) == f"prefect-{run_id}"
    name = sandbox_name_for("my flow/run " + "x" * 80, run_id)
    assert len(name) <= 64 and name.endswith(str(run_id)) and " " not in name and "/" not in name
    assert sandbox_name_for(f"a-{run_id}", run_id) == f"a-{run_id}"


def test_secret_env_split() -> None:
    assert is_secret_env("PREFECT_API_KEY", "pnu_x")
    assert is_secret_env("PREFECT_API_AUTH_STRING", "admin:pass")
    assert is_secret_env("DATABASE", "postgresql://u:p4ss@db:5432/x")
    assert not is_secret_env("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    plain, secret = split_env({"PREFECT_API_KEY": "k", "MY_TOKEN": "t", "MODE": "fast"})
    assert plain == {"MODE": "fast"} and secret == {"PREFECT_API_KEY": "k", "MY_TOKEN": "t"}


def test_sandbox_env_per_step_sends_modal_token_as_secret_and_spec_without_values() -> None:
    run = _flow_run()
    config = ModalWorkerJobConfiguration(mode="per_step", cpu=2, env={"SVC_TOKEN": "tok-123456"})
    config.prepare_for_flow_run(run)
    plain, secret = config.sandbox_env(
        {
            "MODAL_SERVER_URL": "http://127.0.0.1:1",
            "MODAL_TOKEN_ID": "ak-1",
            "MODAL_TOKEN_SECRET": "as-2",
        }
    )
    assert secret["MODAL_TOKEN_SECRET"] == "as-2" and secret["SVC_TOKEN"] == "tok-123456"
    assert "MODAL_TOKEN_SECRET" not in plain and "SVC_TOKEN" not in plain
    assert plain["PREFECT_MODAL_TASK_ENV_NAMES"] == "SVC_TOKEN"
    assert "tok-123456" not in " ".join(plain.values())
    assert '"cpu": 2.0' in plain["PREFECT_MODAL_TASK_SPEC"]


def test_per_step_runner_from_env_applies_spec_env_and_task_specs(monkeypatch: Any) -> None:
    from prefect_modal.worker.per_step import PerStepTaskRunner, runner_from_env

    environ = {
        "PREFECT_MODAL_TASK_SPEC": '{"cpu": 2.0}',
        "PREFECT_MODAL_TASK_ENV_NAMES": "SVC_TOKEN,MODE",
        "SVC_TOKEN": "tok-123456",
        "MODE": "fast",
        "PREFECT_MODAL_MAX_PARALLELISM": "3",
        "PREFECT_MODAL_TASK_SPECS": '{"train": {"gpu": "A100"}}',
    }
    runner = runner_from_env(environ)
    assert isinstance(runner, PerStepTaskRunner) and runner.max_parallelism == 3
    assert runner.spec.cpu == 2.0 and runner.spec.plain_env() == {"MODE": "fast"}
    assert runner.spec.secret_env() == {"SVC_TOKEN": "tok-123456"}

    class FakeTask:  # only its name is read
        name = "train"

    assert runner.options_for(FakeTask()).spec.gpu_config == "A100"  # type: ignore[arg-type]
    assert runner.duplicate().options_for(FakeTask()).spec.cpu == 2.0  # type: ignore[arg-type]


def test_crash_message_has_exit_code_tail_and_no_secret() -> None:
    message = crash_message("sb-1", 137, "a\nb\nkey=s3cr3t-value\n", ["s3cr3t-value"])
    assert "sb-1" in message and "137" in message and "terminated" in message
    assert message.endswith("a\nb\nkey=***")
    assert "timeout" in crash_message("sb-1", 124, "")
    assert "no longer exists" in crash_message("sb-1", None, "")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_forwarder_skips_prefect_records_and_redacts() -> None:
    run_logger, worker_logger = logging.getLogger("t.run"), logging.getLogger("t.worker")
    run_h, worker_h = _Collect(), _Collect()
    run_logger.addHandler(run_h)
    worker_logger.addHandler(worker_h)
    for lg in (run_logger, worker_logger):
        lg.setLevel(logging.INFO)
        lg.propagate = False
    fw = SandboxLogForwarder(run_logger, worker_logger, "sb-1", ["s3cr3t-value"])
    fw.on_line("stderr", "12:00:01.123 | ERROR   | prefect.flow_runs - boom")
    fw.on_line("stderr", "Traceback (most recent call last):")
    fw.on_line("stderr", '  File "x.py", line 1')
    fw.on_line("stderr", "ValueError: boom")
    fw.on_line("stdout", "user print with s3cr3t-value")
    fw.on_line("stderr", "native library warning")
    assert run_h.lines == [
        "[sandbox sb-1 stdout] user print with ***",
        "[sandbox sb-1 stderr] native library warning",
    ]
    assert len(worker_h.lines) == 4 and "boom" in worker_h.lines[0]


def test_per_step_runner_uses_the_warm_pools_with_the_flows_settings() -> None:
    """per_step mode is a ModalTaskRunner: warm by default, the flow's reuse settings kept,
    and a task's modal_options(reuse=False) survives the pool's per-task spec."""
    from prefect import task

    from prefect_modal import ModalTaskRunner, modal_options
    from prefect_modal.worker.per_step import runner_from_env

    environ = {"PREFECT_MODAL_TASK_SPECS": '{"train": {"gpu": "A100"}}'}
    assert runner_from_env(environ).reuse_sandboxes is True
    strict = runner_from_env(
        environ, flow_runner=ModalTaskRunner(reuse_sandboxes=False, idle_seconds=5)
    )
    assert strict.reuse_sandboxes is False and strict.idle_seconds == 5

    @modal_options(reuse=False)
    @task(name="train")
    def train() -> None:
        return None

    options = runner_from_env(environ).options_for(train)
    assert options.spec is not None and options.spec.gpu_config == "A100"
    assert options.reuse is False
