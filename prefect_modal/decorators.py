"""`@modal(work_pool=...)`: call a flow and it runs whole in a Modal Sandbox.

The Modal counterpart of ``prefect_docker.decorators.docker`` and
``prefect_kubernetes.decorators.kubernetes``: built on Prefect's
`bind_flow_to_infrastructure`, it returns an `InfrastructureBoundFlow` whose
worker is `ModalWorker`.  Calling the flow starts that worker in the caller's
process, which runs the flow run in one sandbox with the pool's job variables
overridden by the decorator's (``gpu``, ``memory``, ``image``, ``mode``...),
and returns the flow's value (or raises its exception).  ``.submit()`` returns
Prefect's flow-run future.

The name clashes with the Modal SDK's ``import modal``; in a file that uses
both, alias one of them::

    import modal                                            # the Modal SDK
    from prefect_modal.decorators import modal as modal_infra

    @modal_infra(work_pool="my-modal-pool", gpu="A10G")
    @flow
    def train(): ...

Before any flow run or sandbox exists, the call checks that the pool exists
and is of type ``modal`` and that the flow can be bundled, and says the
command that fixes each problem (`prefect_modal.adhoc`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from prefect.flows import Flow, InfrastructureBoundFlow, bind_flow_to_infrastructure
from prefect.futures import PrefectFlowRunFuture
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.utilities.callables import get_call_parameters

from prefect_modal.worker.worker import ModalWorker

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

P = Any
R = TypeVar("R")


class ModalBoundFlow(InfrastructureBoundFlow[Any, Any]):
    """An `InfrastructureBoundFlow` on a ``modal`` pool, with checks before each call.

    Its worker never creates the pool (a typo must not create a second pool)
    and never adopts or reaps sandboxes of the pool's other runs.
    """

    def _worker(self) -> ModalWorker:
        return ModalWorker(
            work_pool_name=self.work_pool, create_pool_if_not_found=False, reconcile_pool=False
        )

    async def _submit_async(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        from prefect_modal.worker.adhoc import preflight

        await preflight(self, self.work_pool, self.job_variables)
        parameters = get_call_parameters(self, args, kwargs)
        async with self._worker() as worker:
            return await worker.submit(
                flow=self, parameters=parameters, job_variables=self.job_variables
            )

    def __call__(  # type: ignore[override]
        self,
        *args: Any,
        return_state: bool = False,
        wait_for: Any = None,
        **kwargs: Any,
    ) -> Any:
        async def call() -> Any:
            from prefect_modal.worker.adhoc import preflight

            await preflight(self, self.work_pool, self.job_variables)
            parameters = get_call_parameters(self, args, kwargs)
            try:
                async with self._worker() as worker:
                    future = await worker.submit(
                        flow=self, parameters=parameters, job_variables=self.job_variables
                    )
                    if return_state:
                        await future.wait_async()
                        return future.state
                    return await future.aresult()
            except BaseExceptionGroup as group:
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise

        if inspect.iscoroutinefunction(self.fn):
            return call()
        return run_coro_as_sync(call())

    def submit(self, *args: Any, **kwargs: Any) -> PrefectFlowRunFuture[Any]:  # type: ignore[override]
        """Start the flow run on Modal; returns Prefect's flow-run future.

        Like Prefect's own, it returns once the run's sandbox has finished (the
        worker runs in this process); `.result()` then reads the value.
        """
        return run_coro_as_sync(self._submit_async(args, kwargs))


def modal(
    work_pool: str,
    include_files: Sequence[str] | None = None,
    launcher: list[str] | dict[str, list[str]] | None = None,
    **job_variables: Any,
) -> Callable[[Flow[Any, R]], InfrastructureBoundFlow[Any, R]]:
    """Run the decorated flow on a ``modal`` work pool whenever it is called.

    Args:
        work_pool: name of a work pool of type ``modal``.
        include_files: file patterns (relative to the flow's file) sent with the
            flow's bundle and unpacked in the sandbox's working directory.
        launcher: Prefect's bundle launcher override: the command that runs the
            bundle in the sandbox (``{"execution": [...]}``) and, with pool
            storage, the one that uploads it (``{"upload": [...]}``).
        **job_variables: the pool's job variables to override for these runs:
            ``gpu``, ``cpu``, ``memory``, ``image``, ``pip_packages``, ``timeout``,
            ``mode`` ("pipeline" or "per_step"), ``env``...

    Example::

        from prefect import flow
        from prefect_modal.decorators import modal

        @modal(work_pool="my-modal-pool", cpu=2, memory="4GiB")
        @flow
        def add(x: int, y: int) -> int:
            return x + y

        assert add(1, 2) == 3
    """

    def decorator(flow: Flow[Any, R]) -> InfrastructureBoundFlow[Any, R]:
        if not isinstance(flow, Flow):
            raise TypeError(
                f"@modal(work_pool={work_pool!r}) decorates a Prefect flow, got "
                f"{type(flow).__name__}; put @flow under it:\n"
                f"    @modal(work_pool={work_pool!r})\n    @flow\n    def my_flow(): ..."
            )
        bound: InfrastructureBoundFlow[Any, R] = bind_flow_to_infrastructure(
            flow,
            work_pool,
            ModalWorker,
            job_variables=job_variables,
            launcher=launcher,  # type: ignore[arg-type]
            include_files=include_files,
        )
        modal_bound = object.__new__(ModalBoundFlow)
        modal_bound.__dict__.update(bound.__dict__)
        return modal_bound

    return decorator


__all__ = ["ModalBoundFlow", "modal"]
