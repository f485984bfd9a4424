"""`modal_options` and the runner's merging of specs: no servers needed."""

from __future__ import annotations

import pytest
from prefect import task
from pydantic import ValidationError

from prefect_modal import ModalTaskRunner, SandboxSpec, modal_options
from prefect_modal.task_runner.options import bound_options


@task
def plain() -> int:
    return 1


def test_precedence_runner_then_task_then_with_blocks():
    runner = ModalTaskRunner(SandboxSpec(cpu=1, memory=512, env={"A": "runner"}))
    bound = modal_options(gpu="a100", memory="2GiB", env={"B": "task"})(plain)
    with modal_options(memory=4096):
        with modal_options(cpu=8):
            spec = runner.options_for(bound).spec
    assert spec is not None
    assert (spec.gpu_config, spec.cpu, spec.memory) == ("A100", 8.0, 4096)
    assert spec.plain_env() == {"A": "runner", "B": "task"}
    assert runner.options_for(plain).spec == runner.spec  # the original task is untouched
    assert bound_options(plain).spec is None


def test_decorator_under_task_survives_with_options():
    @task
    @modal_options(gpu="T4", local=False)
    def f() -> None: ...

    renamed = f.with_options(name="renamed")
    runner = ModalTaskRunner(default_local=True)
    opts = runner.options_for(renamed)
    assert opts.local is False and opts.spec is not None and opts.spec.gpu_config == "T4"


def test_local_choice_and_default():
    assert ModalTaskRunner().options_for(plain).local is False
    assert ModalTaskRunner(default_local=True).options_for(plain).local is True
    with modal_options(local=True):
        assert ModalTaskRunner().options_for(plain).local is True
    assert ModalTaskRunner().options_for(modal_options(local=True)(plain)).local is True


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"gpu": "Z80"}, "Z80"),
        ({"memory": "lots"}, "memory"),
        ({"cpu": 0}, "cpu=0"),
        ({"timeout": 10**6}, "timeout"),
        ({"gpu_count": 2}, "gpu_count"),
        ({"volumes": {"data": "v"}}, "absolute"),
    ],
)
def test_bad_values_fail_when_written(fields, match):
    with pytest.raises(ValidationError, match=match):
        modal_options(**fields)


def test_runner_arguments_are_checked():
    with pytest.raises(ValueError, match="max_parallelism"):
        ModalTaskRunner(max_parallelism=0)
    with pytest.raises(TypeError, match="SandboxSpec"):
        ModalTaskRunner(spec="A100")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="task or a function"):
        modal_options(cpu=1)(42)  # type: ignore[arg-type]
