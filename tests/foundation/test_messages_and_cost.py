"""Refusals name the value (never a secret's); cost estimates follow the documented arithmetic."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from prefect_modal import ModalCredentials, SandboxSpec
from prefect_modal.core import pricing
from prefect_modal.core.artifacts import SandboxArtifact, cost_note, total_row
from prefect_modal.worker.worker import ModalWorkerJobConfiguration

SECRET = "hunter2-very-secret-value"


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"cpu": "many"}, "cpu='many'"),
        ({"gpu_count": "two"}, "gpu_count='two'"),
        ({"timeout": "long"}, "timeout='long'"),
        ({"memory": [1]}, "memory=[1]"),
        ({"region": 5}, "region=5"),
        ({"secrets": 5}, "secrets=5"),
        ({"gpu": 5}, "gpu=5"),
        ({"volumes": "x"}, "volumes='x'"),
    ],
)
def test_a_refused_value_is_named_with_its_field(kwargs: dict, shown: str) -> None:
    with pytest.raises(ValidationError) as refused:
        SandboxSpec(**kwargs)
    message = str(refused.value)
    assert shown in message
    assert "Expected:" in message  # and what is accepted


def test_the_cpu_message_names_many_as_a_job_variable_too() -> None:
    with pytest.raises(ValidationError) as refused:
        ModalWorkerJobConfiguration(cpu="many")
    assert "cpu='many'" in str(refused.value)


def test_no_secret_value_in_any_env_message() -> None:
    attempts = [
        {"env": {"DB_PASSWORD": [SECRET]}},
        {"env": {"API_TOKEN": SECRET, "bad=name": "x"}},
        {"env": {"API_TOKEN": SECRET}, "cpu": "many"},
        {"env": f"API_TOKEN={SECRET}"},
        {"env": {"PLAIN": {"nested": SECRET}}},
    ]
    for kwargs in attempts:
        with pytest.raises(ValidationError) as refused:
            SandboxSpec(**kwargs)
        text = (
            str(refused.value)
            + repr(refused.value)
            + json.dumps(refused.value.errors(include_url=False), default=str)
        )
        assert SECRET not in text, kwargs
        assert "env" in text or "cpu='many'" in text
    with pytest.raises(ValidationError) as refused:
        ModalWorkerJobConfiguration(env={"API_TOKEN": SECRET}, cpu="many")
    assert SECRET not in str(refused.value) and "cpu='many'" in str(refused.value)
    with pytest.raises(ValidationError) as refused:
        ModalCredentials(token_id="ak-1", token_secret=[SECRET])  # type: ignore[arg-type]
    assert SECRET not in str(refused.value) + repr(refused.value)


# -- cost --------------------------------------------------------------------------


@pytest.fixture
def known_rates() -> pytest.FixtureRequest:
    pricing.set_rates(
        {
            "as_of": "2026-01-01",
            "source": "test",
            "cpu_core_second": 0.00004,
            "memory_gib_second": 0.000006,
            "gpu_second": {"A100": 0.0006},
        }
    )
    yield
    pricing.set_rates(None)


def _record(resources: dict, seconds: float | None) -> SandboxArtifact:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return SandboxArtifact(
        sandbox_id="sb-1",
        app_name="app",
        target="local",
        mode="per_step",
        resources=resources,
        status="succeeded" if seconds is not None else "running",
        started_at=start,
        ended_at=start + timedelta(seconds=seconds) if seconds is not None else None,
    )


def test_cost_is_rate_times_resources_times_seconds(known_rates: None) -> None:
    spec = SandboxSpec(cpu=2, memory="4GiB", gpu="A100:2")
    record = _record(spec.describe(), 100)
    # (2 cores x 0.00004 + 4 GiB x 0.000006 + 2 GPUs x 0.0006) x 100 s
    assert record.estimated_cost() == pytest.approx((0.00008 + 0.000024 + 0.0012) * 100)
    # Modal's minimum (0.125 core, 128 MiB) when nothing is asked; whole seconds, at least one
    bare = _record({}, 0.2)
    assert bare.estimated_cost() == pytest.approx(0.125 * 0.00004 + 0.125 * 0.000006)
    row = record.summary_row()
    assert row["estimated_cost_usd"] == pytest.approx(0.1304) and row["seconds"] == 100.0


def test_the_table_has_a_total_and_calls_it_an_estimate(known_rates: None) -> None:
    records = [_record({"cpu": 1.0}, 10), _record({"cpu": 1.0}, 30), _record({"gpu": "ANY"}, 5)]
    total = total_row(records)
    assert total["estimated_cost_usd"] == pytest.approx((10 + 30) * (0.00004 + 0.125 * 0.000006))
    assert "estimate" in total["task"]
    note = cost_note(records)
    assert "Estimated cost" in note and "2026-01-01" in note and "not a bill" in note
    assert "1 sandbox(es) without an estimate" in note  # ANY has no rate: no guess


def test_packaged_rates_have_a_date_a_source_and_every_gpu_type() -> None:
    from prefect_modal.core.resources import KNOWN_GPU_TYPES

    rates = pricing.current_rates()
    assert rates.as_of and "modal.com/pricing" in rates.source
    assert set(KNOWN_GPU_TYPES) - {"ANY"} <= set(rates.gpu_second)


def test_a_rates_file_overrides_some_rates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"cpu_core_second": 1.0, "gpu_second": {"T4": 2.0}}))
    monkeypatch.setenv(pricing.RATES_FILE_ENV, str(path))
    rates = pricing.current_rates()
    assert rates.cpu_core_second == 1.0 and rates.gpu_second["T4"] == 2.0
    assert rates.gpu_second["H100"] == pricing._packaged_rates().gpu_second["H100"]
    assert str(path) in rates.as_of
    assert pricing.rate_per_second({"cpu": 2, "gpu": "T4"}) == pytest.approx(
        2.0 + 2.0 + 0.125 * rates.memory_gib_second
    )
    monkeypatch.setenv(pricing.RATES_FILE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"missing\.json"):
        pricing.current_rates()
