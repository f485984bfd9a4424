"""conftest.py of a published task-runner test suite, run with ModalTaskRunner substituted.

`test_published_suites.py` copies this file next to a test file it took from a
published source (prefect-dask's sdist on PyPI, a Prefect checkout) and runs
pytest there in a subprocess.  Nothing of those suites lives in this
repository; this file only swaps the runner they test for `ModalTaskRunner`:

* `prefect.task_runners.ThreadPoolTaskRunner` (and the flows' default runner)
  becomes a `ModalTaskRunner` on a local Modal server, for Prefect's own tests;
* `prefect_dask.DaskTaskRunner` becomes the same runner (Dask's own arguments
  ignored), with stand-ins for the Dask modules the test file imports when
  they are not installed; tests of Dask itself are deselected by the caller.

It also runs `async def` tests (those suites use pytest-asyncio's auto mode)
and gives the session a Prefect API (Prefect's test harness).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import tempfile
import types
from typing import Any

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import prefect.flows
import prefect.task_runners
from prefect.futures import PrefectConcurrentFuture

from prefect_modal import ModalCredentials, ModalTaskRunner, SandboxSpec
from prefect_modal.local import LocalModal

_server = LocalModal(state_dir=tempfile.mkdtemp(prefix="published-suite-modal-"))
_server.__enter__()
_credentials = ModalCredentials(
    token_id=_server.env["MODAL_TOKEN_ID"],
    token_secret=_server.env["MODAL_TOKEN_SECRET"],
    server_url=_server.url,
)

#: Runner arguments of the substituted runners that mean nothing here.
_FOREIGN = (
    "cluster",
    "address",
    "cluster_class",
    "cluster_kwargs",
    "adapt_kwargs",
    "client_kwargs",
    "performance_report_path",
)


_PYTEST_PIN = f"pytest=={importlib.metadata.version('pytest')}"


class SubstitutedRunner(ModalTaskRunner[Any]):
    """`ModalTaskRunner` on the session's local Modal server, taking the substituted
    runner's constructor arguments (`max_workers` kept, Dask's ignored)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: Dask's own configuration, kept readable (the suites look at it) and unused.
        self.cluster_kwargs = dict(kwargs.get("cluster_kwargs") or {})
        for name in _FOREIGN:
            kwargs.pop(name, None)
        kwargs.setdefault("credentials", _credentials)
        # the suites' tasks live in test modules that refer to pytest's objects: their
        # images need pytest, as they would on Modal (images hold only what they list)
        kwargs.setdefault("spec", SandboxSpec(pip_packages=[_PYTEST_PIN]))
        kwargs.setdefault("max_parallelism", int(os.environ.get("PUBLISHED_MAX_PARALLELISM", "64")))
        super().__init__(*args, **kwargs)


prefect.task_runners.ThreadPoolTaskRunner = SubstitutedRunner  # type: ignore[misc]
prefect.flows.ThreadPoolTaskRunner = SubstitutedRunner  # type: ignore[attr-defined]


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _stand_ins_for_dask() -> None:
    """What prefect-dask's test file imports, when Dask itself is not installed."""
    if importlib.util.find_spec("prefect_dask") is None:
        tr = _module(
            "prefect_dask.task_runners",
            DaskTaskRunner=SubstitutedRunner,
            PrefectDaskFuture=PrefectConcurrentFuture,
        )
        _module("prefect_dask", DaskTaskRunner=SubstitutedRunner, task_runners=tr)

    class _Cluster:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.scheduler_address = "tcp://127.0.0.1:0"

        def __enter__(self) -> _Cluster:
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

    class _Client(_Cluster):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.scheduler = types.SimpleNamespace(address="tcp://127.0.0.1:0")

    if importlib.util.find_spec("distributed") is None:
        _module("distributed", LocalCluster=_Cluster, Client=_Client)
    if importlib.util.find_spec("dask") is None:
        dataframe = _module("dask.dataframe")
        _module("dask", dataframe=dataframe)
    if importlib.util.find_spec("pandas") is None:
        _module("pandas")


_stand_ins_for_dask()


@pytest.fixture(scope="session", autouse=True)
def _prefect_api() -> Any:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_unconfigure(config: pytest.Config) -> None:
    _server.__exit__(None, None, None)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def` tests in an event loop of their own (pytest-asyncio's auto mode)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True
