"""Which installed distributions a pickled call refers to (no servers needed)."""

from __future__ import annotations

import importlib.metadata
import json

import pydantic
from prefect import get_run_logger

from prefect_modal.core import packages
from prefect_modal.task_runner import pickling

PREFECT = f"prefect=={importlib.metadata.version('prefect')}"
PYDANTIC = f"pydantic=={importlib.metadata.version('pydantic')}"
HTTPX = f"httpx=={importlib.metadata.version('httpx')}"


class Point(pydantic.BaseModel):
    x: int


def logs() -> None:
    get_run_logger().info("hi")


def imports_in_body() -> str:
    import httpx

    return json.dumps(httpx.__name__)


def helper_imports() -> str:
    return imports_in_body()


def plain(x: int) -> int:
    return x + 1


def _requirements(fn, *args) -> packages.Requirements:
    """As a call does: this test module travels by value, so what it refers to counts."""
    payload = pickling.dumps_call(fn, args, {})
    modules = packages.call_modules(fn, args, {}, payload, pickling.is_user_module)
    return packages.requirements(modules, pickling.is_user_module)


def test_references_found_in_the_pickle_the_code_and_the_arguments():
    assert _requirements(logs).pins == (PREFECT,) and _requirements(logs).uses_prefect
    assert _requirements(imports_in_body).pins == (HTTPX,)  # `json` is stdlib
    assert HTTPX in _requirements(helper_imports).pins  # through a function it calls
    assert _requirements(plain, 1) == packages.Requirements(modules=("cloudpickle",), pins=())
    assert PYDANTIC in _requirements(plain, Point(x=1)).pins


def test_large_payloads_are_sampled_by_type_not_read_opcode_by_opcode():
    big = list(range(100_000))
    payload = pickling.dumps_call(plain, (big, Point(x=1)), {})
    assert len(payload) > packages.EXACT_SCAN_BYTES
    modules = packages.call_modules(plain, (big, Point(x=1)), {}, payload, pickling.is_user_module)
    assert "pydantic" in modules and "prefect" not in modules


def test_the_users_own_requirement_wins():
    pins = [PREFECT, PYDANTIC]
    assert packages.missing_pins(pins, ["Prefect>=3", "numpy"]) == [PYDANTIC]
    assert packages.missing_pins(pins, ["pydantic[email]==2.0"]) == [PREFECT]
    assert packages.requirement_name("Typing_Extensions ; python_version<'3.12'") == (
        "typing-extensions"
    )
