"""Warm sandboxes (issue 13): per-step calls with equal settings share sandboxes
within a flow run, one call at a time; `reuse_sandboxes=False` keeps one per call."""

from __future__ import annotations

from prefect import flow, task
from prefect.context import get_run_context
from runner_support import sandboxes_of

from prefect_modal import modal_options


@task
def double(x: int) -> int:
    return 2 * x


@task
def bump_module_state() -> int:
    """A module that stays imported in a warm sandbox keeps its attributes."""
    import sys
    import types

    state = sys.modules.setdefault("pm_warm_state", types.ModuleType("pm_warm_state"))
    state.count = getattr(state, "count", 0) + 1  # type: ignore[attr-defined]
    return state.count  # type: ignore[attr-defined]


def _flow_run_id() -> object:
    return get_run_context().flow_run.id  # type: ignore[union-attr]


def test_sixty_calls_at_parallelism_four_share_at_most_eight_sandboxes(make_runner, modal_server):
    @flow(task_runner=make_runner(max_parallelism=4))
    def sixty() -> tuple[object, list[int]]:
        return _flow_run_id(), double.map(range(60)).result()

    run_id, results = sixty()
    assert results == [2 * i for i in range(60)]
    used = sandboxes_of(modal_server, run_id)
    assert 1 <= len(used) <= 8, len(used)
    assert all(s.status != "running" for s in used), [s.status for s in used]


def test_without_reuse_every_call_gets_its_own_sandbox(make_runner, modal_server):
    @flow(task_runner=make_runner(max_parallelism=4, reuse_sandboxes=False))
    def six() -> tuple[object, list[int]]:
        return _flow_run_id(), double.map(range(6)).result()

    run_id, results = six()
    assert results == [0, 2, 4, 6, 8, 10]
    assert len(sandboxes_of(modal_server, run_id)) == 6


def test_module_state_persists_only_in_warm_mode(make_runner, modal_server):
    @flow(task_runner=make_runner(max_parallelism=1))
    def warm() -> list[int]:
        return [bump_module_state.submit().result() for _ in range(3)]

    @flow(task_runner=make_runner(max_parallelism=1, reuse_sandboxes=False))
    def cold() -> list[int]:
        return [bump_module_state.submit().result() for _ in range(3)]

    isolated = modal_options(reuse=False)(bump_module_state)

    @flow(task_runner=make_runner(max_parallelism=1))
    def opted_out() -> list[int]:
        return [isolated.submit().result() for _ in range(3)]

    assert warm() == [1, 2, 3]
    assert cold() == [1, 1, 1]
    assert opted_out() == [1, 1, 1]
