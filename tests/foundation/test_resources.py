"""Every resource rule, fed the bad value itself; messages must name field and value."""

from __future__ import annotations

import pytest

from prefect_modal.core import resources
from prefect_modal.core.resources import ResourceError


@pytest.mark.parametrize(
    ("gpu", "count", "expected"),
    [
        ("A100", 2, "A100:2"),
        ("a100", 2, "A100:2"),
        ("A100", None, "A100"),
        ("A100", 1, "A100"),
        ("h100!", None, "H100!"),
        ("a100-80gb", 4, "A100-80GB:4"),
        ("l40s:2", None, "L40S:2"),
        ("l40s:2", 2, "L40S:2"),
        ("A10", None, "A10G"),
        (None, None, None),
        ("", None, None),
        ("  ", 0, None),
    ],
)
def test_gpu_string(gpu: str | None, count: int | None, expected: str | None) -> None:
    assert resources.gpu_string(gpu, count) == expected


def test_gpu_count_without_type_says_how_to_set_type() -> None:
    with pytest.raises(ResourceError, match=r"gpu_count=2 is set but gpu is not.*gpu='A100'"):
        resources.gpu_string(None, 2)


def test_gpu_type_with_count_zero_warns_and_runs_on_cpu() -> None:
    with pytest.warns(UserWarning, match="count of 0 asks for no GPU"):
        assert resources.gpu_string("T4", 0) is None


def test_gpu_count_conflict_names_both_values() -> None:
    with pytest.raises(ResourceError, match=r"gpu='A100:2' asks for 2 GPU\(s\) but gpu_count=3"):
        resources.gpu_string("A100:2", 3)


def test_unknown_gpu_lists_known_types() -> None:
    with pytest.raises(ResourceError) as info:
        resources.gpu_string("V100")
    message = str(info.value)
    assert "gpu='V100'" in message
    for known in ("T4", "A100-80GB", "H100!", "B200"):
        assert known in message


def test_gpu_count_not_a_number() -> None:
    with pytest.raises(ResourceError, match=r"gpu='A100:two'.*whole number"):
        resources.gpu_string("A100:two")


def test_negative_gpu_count() -> None:
    with pytest.raises(ResourceError, match="gpu_count=-1 is negative"):
        resources.gpu_string("A100", -1)


@pytest.mark.parametrize(
    ("value", "mib"),
    [
        ("16GB", 15259),  # 16e9 bytes / 2**20, rounded up
        ("16GiB", 16384),
        ("16Gi", 16384),
        ("512MiB", 512),
        ("512MB", 489),  # 512e6 / 2**20 = 488.28 -> 489
        ("2Gi", 2048),
        ("1.5GiB", 1536),
        ("1TB", 953675),
        ("2048", 2048),
        (" 4 gib ", 4096),
        (2048, 2048),
        (1.2, 2),
        ("100KB", 1),
    ],
)
def test_memory_units(value: str | int | float, mib: int) -> None:
    assert resources.memory_mib(value) == mib


@pytest.mark.parametrize(
    "bad", ["0", "0GB", "-1GB", "-5", "16GBB", "16 parsecs", "GB", "1e3MB", "sixteen"]
)
def test_memory_bad_values_name_field_value_and_forms(bad: str) -> None:
    with pytest.raises(ResourceError) as info:
        resources.memory_mib(bad)
    message = str(info.value)
    assert f"memory={bad!r}" in message
    assert "GiB" in message and "GB" in message


@pytest.mark.parametrize("bad", [0, -3, float("nan"), float("inf"), True])
def test_memory_bad_numbers(bad: float) -> None:
    with pytest.raises(ResourceError, match=rf"memory={bad!r}"):
        resources.memory_mib(bad)


def test_memory_empty_string_means_unset() -> None:
    assert resources.memory_mib("") is None
    assert resources.memory_mib(None) is None


@pytest.mark.parametrize("bad", [0, -1, -0.5, float("nan")])
def test_cpu_must_be_positive(bad: float) -> None:
    with pytest.raises(ResourceError, match=rf"cpu={bad!r} must be a number of CPU cores above 0"):
        resources.check_cpu(bad)


@pytest.mark.parametrize("bad", [0, -5, 86_401, 10**9])
def test_timeout_range(bad: int) -> None:
    with pytest.raises(ResourceError, match=rf"timeout={bad!r} seconds is out of range.*86400"):
        resources.check_timeout(bad)


def test_timeout_bounds_accepted() -> None:
    assert resources.check_timeout(1) == 1
    assert resources.check_timeout(86_400) == 86_400


def test_cloud() -> None:
    assert resources.check_cloud("AWS") == "aws"
    assert resources.check_cloud("") is None
    with pytest.raises(ResourceError, match=r"cloud='azure'.*aws, gcp, oci, auto"):
        resources.check_cloud("azure")


def test_regions() -> None:
    assert resources.check_regions("us-east") == ["us-east"]
    assert resources.check_regions("us-east, eu-west") == ["us-east", "eu-west"]
    assert resources.check_regions(["us", "eu"]) == ["us", "eu"]
    assert resources.check_regions("") is None
    with pytest.raises(ResourceError, match=r"region='us east'"):
        resources.check_regions("us east")


def test_absolute_path() -> None:
    assert resources.check_absolute_path("/data", "workdir") == "/data"
    with pytest.raises(ResourceError, match=r"workdir='data' must be an absolute path"):
        resources.check_absolute_path("data", "workdir")


@pytest.mark.parametrize(
    "name",
    [
        "PREFECT_API_KEY",
        "MODAL_TOKEN_SECRET",
        "MODAL_TOKEN_ID",
        "GITHUB_TOKEN",
        "DB_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
        "OPENAI_API_KEY",
        "MY_SECRET",
        "hf_token",
    ],
)
def test_secret_names(name: str) -> None:
    assert resources.is_secret_env_name(name)


@pytest.mark.parametrize(
    "name", ["PATH", "MODE", "LOG_LEVEL", "KEYBOARD_LAYOUT", "TOKENIZERS_PARALLELISM"]
)
def test_plain_names(name: str) -> None:
    assert not resources.is_secret_env_name(name)


def test_split_secret_env() -> None:
    plain, secret = resources.split_secret_env(
        {"MODE": "fast", "PREFECT_API_KEY": "pnu_123", "DB_PASSWORD": "hunter2"}
    )
    assert plain == {"MODE": "fast"}
    assert secret == {"PREFECT_API_KEY": "pnu_123", "DB_PASSWORD": "hunter2"}
