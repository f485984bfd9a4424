"""An estimate of what a sandbox costs, from Modal's published per-second rates.

Modal bills a sandbox by the second for its CPU cores, its GiB of memory and
its GPUs.  A team running flows every day wants to see that next to each run,
so every sandbox record carries an *estimate*: the rates (in
`data/modal_rates.json`, with the date they were read and their source) times
the resources the sandbox asked for times the seconds it ran.  It is an
estimate, never a bill: Modal charges max(request, usage), adds region and
non-preemptible multipliers, and subtracts plan credits.

Rates change; a user overrides them with a JSON file of the same shape (any
subset of the keys) named by ``PREFECT_MODAL_RATES_FILE``, or in Python with
`set_rates`.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from functools import lru_cache
from importlib import resources as package_files
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Environment variable naming a JSON file whose rates replace the packaged ones.
RATES_FILE_ENV = "PREFECT_MODAL_RATES_FILE"

#: What Modal reserves when a sandbox asks for nothing (its documented minimum).
MODAL_DEFAULT_CPU = 0.125
MODAL_DEFAULT_MEMORY_MIB = 128


class Rates(BaseModel):
    """Per-second list prices, with where and when they were read."""

    model_config = ConfigDict(extra="forbid")

    currency: str = "USD"
    as_of: str = Field(description="Date the rates were read from the source (YYYY-MM-DD).")
    source: str
    notes: str | None = None
    cpu_core_second: float = Field(ge=0)
    memory_gib_second: float = Field(ge=0)
    gpu_second: dict[str, float] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        """How a table names these rates: 'Modal list prices of 2026-06-27'."""
        return f"Modal list prices of {self.as_of}"


def _packaged() -> dict[str, Any]:
    text = package_files.files("prefect_modal").joinpath("data/modal_rates.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


_override: Rates | None = None


@lru_cache(maxsize=8)
def _from_file(path: str, mtime: float) -> Rates:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{RATES_FILE_ENV}={path!r} is not a readable JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{RATES_FILE_ENV}={path!r} must hold a JSON object of rates.")
    merged = _packaged()
    gpus = {**merged.get("gpu_second", {}), **(data.pop("gpu_second", None) or {})}
    merged.update(data)
    merged["gpu_second"] = gpus
    if "as_of" not in data:
        merged["as_of"] = f"{merged['as_of']} (overridden by {path})"
    return Rates.model_validate(merged)


def current_rates() -> Rates:
    """`set_rates` if called, else the file named by PREFECT_MODAL_RATES_FILE, else ours."""
    if _override is not None:
        return _override
    path = os.environ.get(RATES_FILE_ENV)
    if path:
        try:
            mtime = os.stat(path).st_mtime
        except OSError as exc:
            raise ValueError(f"{RATES_FILE_ENV}={path!r} cannot be read: {exc}") from None
        return _from_file(path, mtime)
    return _packaged_rates()


@lru_cache(maxsize=1)
def _packaged_rates() -> Rates:
    return Rates.model_validate(_packaged())


def set_rates(rates: Rates | dict[str, Any] | None) -> None:
    """Use these rates in this process (a dict may give only some keys); None restores ours."""
    global _override
    if rates is None or isinstance(rates, Rates):
        _override = rates
        return
    base = _packaged_rates().model_dump()
    gpus = {**base["gpu_second"], **(rates.get("gpu_second") or {})}
    _override = Rates.model_validate({**base, **rates, "gpu_second": gpus})


def _gpu_type_and_count(gpu: str | None) -> tuple[str | None, int]:
    if not gpu:
        return None, 0
    kind, _, count = str(gpu).partition(":")
    return kind, int(count) if count.isdigit() else 1


def rate_per_second(resources: dict[str, Any], rates: Rates | None = None) -> float | None:
    """Dollars per second for a sandbox with these resources (a `SandboxSpec.describe()`).

    None when the GPU type has no known rate ("ANY", a type newer than the rates):
    an estimate that silently left out the GPU would be worse than none.
    """
    rates = rates or current_rates()
    cpu = resources.get("cpu") or MODAL_DEFAULT_CPU
    memory_mib = resources.get("memory_mib") or MODAL_DEFAULT_MEMORY_MIB
    per_second = float(cpu) * rates.cpu_core_second
    per_second += float(memory_mib) / 1024 * rates.memory_gib_second
    kind, count = _gpu_type_and_count(resources.get("gpu"))
    if kind is not None:
        gpu_rate = rates.gpu_second.get(kind)
        if gpu_rate is None:
            return None
        per_second += count * gpu_rate
    return per_second


def estimate_cost(
    resources: dict[str, Any],
    started_at: datetime,
    ended_at: datetime | None,
    now: datetime | None = None,
    rates: Rates | None = None,
) -> float | None:
    """Estimated dollars for a sandbox from its start to its end (or to `now` while it runs).

    Modal bills whole seconds, at least one; rounded to 1/10000 of a cent in display.
    """
    rate = rate_per_second(resources, rates)
    end = ended_at or now
    if rate is None or end is None:
        return None
    seconds = max(1, math.ceil((end - started_at).total_seconds()))
    return seconds * rate


def format_cost(value: float | None) -> str:
    """'$0.0123' for tables; '-' when there is no estimate."""
    if value is None:
        return "-"
    if value >= 1:
        return f"${value:,.2f}"
    return f"${value:.4f}" if value >= 0.0001 else f"${value:.6f}"
