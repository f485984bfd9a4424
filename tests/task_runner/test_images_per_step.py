"""Per-step tasks run in their image: what the flow's environment has is not there.

The task imports its package with ``importlib.import_module`` of a name built at
run time, which the runner's `auto_packages` cannot see (it adds the packages a
task visibly imports), so only ``pip_packages`` can put it in the image.
"""

from __future__ import annotations

import importlib.metadata

from prefect import flow, task

from prefect_modal import SandboxSpec

#: in the flow's environment (a dependency of prefect), at another version than this
HIDDEN = "".join(["pyd", "antic"])
PINNED = "2.10.6"


@task
def hidden_version() -> str:
    import importlib

    return str(importlib.import_module(HIDDEN).VERSION)


def test_a_package_missing_from_the_image_fails_as_on_modal(make_runner):
    assert importlib.metadata.version(HIDDEN) != PINNED

    @flow(task_runner=make_runner())
    def f():
        fut = hidden_version.submit()
        fut.wait()
        return [fut.state]  # in a list: a returned failed state would fail the flow

    (state,) = f()
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, ModuleNotFoundError) and exc.name == HIDDEN


def test_pip_packages_put_that_exact_version_in_the_image(make_runner):
    @flow(task_runner=make_runner(spec=SandboxSpec(pip_packages=[f"{HIDDEN}=={PINNED}"])))
    def f():
        return hidden_version.submit().result()

    assert f() == PINNED
