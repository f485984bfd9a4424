"""SandboxSpec: validation through pydantic, merging, and what Modal receives."""

from __future__ import annotations

import inspect
import sys

import modal
import pytest
from pydantic import ValidationError

from prefect_modal import SandboxSpec
from prefect_modal.core.spec import DEFAULT_TIMEOUT_SECONDS


def test_issue_example_turns_into_sandbox_create_kwargs() -> None:
    spec = SandboxSpec(gpu="a100", gpu_count=2, memory="16GiB", cpu=4)
    kwargs = spec.sandbox_kwargs()
    assert kwargs["gpu"] == "A100:2"
    assert kwargs["memory"] == 16384
    assert kwargs["cpu"] == 4.0 and isinstance(kwargs["cpu"], float)


def test_sandbox_kwargs_match_the_real_sandbox_create_signature() -> None:
    spec = SandboxSpec(
        gpu="T4",
        cpu=2,
        memory="1GiB",
        timeout=600,
        idle_timeout=60,
        region=["us-east", "eu-west"],
        cloud="gcp",
        env={"MODE": "fast"},
        secrets=["hf"],
        volumes={"/data": "vol"},
        workdir="/app",
    )
    params = inspect.signature(modal.Sandbox.create).parameters
    kwargs = spec.sandbox_kwargs()
    assert set(kwargs) <= set(params), set(kwargs) - set(params)
    assert set(kwargs) == {
        "gpu",
        "cpu",
        "memory",
        "timeout",
        "idle_timeout",
        "region",
        "cloud",
        "env",
        "secrets",
        "volumes",
        "workdir",
    }
    # the values have the types the signature declares
    assert isinstance(kwargs["gpu"], str) and isinstance(kwargs["memory"], int)
    assert kwargs["region"] == ["us-east", "eu-west"]
    assert kwargs["workdir"] == "/app"


def test_single_region_is_passed_as_a_string() -> None:
    assert SandboxSpec(region="us-east").sandbox_kwargs()["region"] == "us-east"


def test_default_timeout_applies_when_unset() -> None:
    assert SandboxSpec().sandbox_kwargs()["timeout"] == DEFAULT_TIMEOUT_SECONDS


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("gpu", "V100", "gpu='V100' is not a GPU type"),
        ("memory", "16GBB", "memory='16GBB'"),
        ("memory", "0", "memory='0'"),
        ("memory", -1, "memory=-1"),
        ("cpu", 0, "cpu=0.0 must be"),
        ("cpu", -2, "cpu=-2.0 must be"),
        ("timeout", 0, "timeout=0 seconds"),
        ("timeout", 86_401, "timeout=86401 seconds"),
        ("idle_timeout", -1, "idle_timeout=-1 seconds"),
        ("cloud", "azure", "cloud='azure'"),
        ("workdir", "relative/dir", "workdir='relative/dir'"),
        ("region", "us east", "region='us east'"),
        ("python_version", "2.7", "python_version='2.7'"),
        ("volumes", {"data": "vol"}, "volumes['data']='data'"),
        ("volumes", {"/data": ""}, "volumes['/data']=''"),
        ("gpu_count", -1, "gpu_count=-1"),
    ],
)
def test_bad_field_values_are_refused_with_field_and_value(
    field: str, value: object, fragment: str
) -> None:
    with pytest.raises(ValidationError) as info:
        SandboxSpec(**{field: value})
    assert fragment in str(info.value)


def test_gpu_count_without_gpu_is_refused() -> None:
    with pytest.raises(ValidationError, match="gpu_count=2 is set but gpu is not"):
        SandboxSpec(gpu_count=2)


def test_gpu_string_and_count_conflict() -> None:
    with pytest.raises(ValidationError, match=r"gpu='A100:2' asks for 2 GPU\(s\) but gpu_count=3"):
        SandboxSpec(gpu="A100:2", gpu_count=3)


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError, match="gpus"):
        SandboxSpec(gpus="A100")  # type: ignore[call-arg]


def test_registry_secret_needs_an_image() -> None:
    with pytest.raises(ValidationError, match="registry_secret='ghcr' is set but image is not"):
        SandboxSpec(registry_secret="ghcr")


def test_empty_strings_mean_unset() -> None:
    spec = SandboxSpec(gpu="", image=" ", app_name="", cloud="", workdir="", memory="")
    assert spec.gpu is None and spec.image is None and spec.memory is None
    assert spec.effective_app_name == "prefect-modal"


def test_secret_env_is_split_and_never_in_repr() -> None:
    spec = SandboxSpec(
        env={"MODE": "fast", "PREFECT_API_KEY": "pnu_topsecret", "DB_PASSWORD": "hunter2"}
    )
    assert spec.plain_env() == {"MODE": "fast"}
    assert spec.secret_env() == {"PREFECT_API_KEY": "pnu_topsecret", "DB_PASSWORD": "hunter2"}
    kwargs = spec.sandbox_kwargs()
    assert kwargs["env"] == {"MODE": "fast"}
    for text in (repr(spec), str(spec), str(kwargs), str(spec.describe()), spec.model_dump_json()):
        assert "pnu_topsecret" not in text
        assert "hunter2" not in text


def test_bad_env_values() -> None:
    with pytest.raises(ValidationError, match="'A=B' is not a valid environment variable name"):
        SandboxSpec(env={"A=B": "x"})
    with pytest.raises(ValidationError, match=r"env\['X'\] must be a string"):
        SandboxSpec(env={"X": ["list"]})


def test_merge_task_over_runner_field_by_field() -> None:
    runner = SandboxSpec(
        cpu=2, memory="4GiB", env={"A": "1", "B": "runner"}, secrets=["s1"], gpu="T4"
    )
    task = SandboxSpec(gpu="A100", gpu_count=2, env={"B": "task"}, secrets=["s2", "s1"])
    merged = runner.merged_with(task)
    assert merged.gpu_config == "A100:2"
    assert merged.cpu == 2.0 and merged.memory == 4096
    assert merged.env == {"A": "1", "B": "task"}
    assert merged.secrets == ["s1", "s2"]


def test_merge_task_gpu_type_drops_runner_count() -> None:
    runner = SandboxSpec(gpu="T4", gpu_count=4)
    assert runner.merged_with(SandboxSpec(gpu="A100:2")).gpu_config == "A100:2"


def test_merge_only_explicitly_set_fields_override() -> None:
    runner = SandboxSpec(timeout=600, app_name="ml")
    merged = runner.merged_with(SandboxSpec(cpu=1))
    assert merged.timeout == 600 and merged.app_name == "ml" and merged.cpu == 1.0
    assert runner.merged_with(None) is runner


def test_a_task_that_changes_only_the_count_must_name_the_type() -> None:
    # A bare count is refused in every spec, task-level included: which GPU it
    # counts would depend on the runner it happens to run under.
    with pytest.raises(ValidationError, match="gpu_count=3 is set but gpu is not"):
        SandboxSpec(gpu="A100:2").merged_with(SandboxSpec(gpu_count=3))


def test_default_python_version_is_local() -> None:
    assert (
        SandboxSpec().effective_python_version
        == f"{sys.version_info.major}.{sys.version_info.minor}"
    )


def test_describe_is_json_safe_and_names_only() -> None:
    spec = SandboxSpec(gpu="h100", memory="2GiB", env={"API_TOKEN": "tok-123"}, secrets=["hf"])
    described = spec.describe()
    assert described["gpu"] == "H100"
    assert described["memory_mib"] == 2048
    assert described["env_names"] == ["API_TOKEN"]
    assert "tok-123" not in str(described)


def test_validation_errors_do_not_echo_secret_env_values() -> None:
    with pytest.raises(ValidationError) as info:
        SandboxSpec(env={"PREFECT_API_KEY": "pnu_leak_me"}, cpu=-1)
    assert "cpu=-1.0" in str(info.value)
    assert "pnu_leak_me" not in str(info.value)
