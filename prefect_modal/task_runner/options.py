"""`modal_options`: per-task sandbox resources for `ModalTaskRunner`.

Prefect's `task.with_options(...)` knows nothing of GPUs, so the options a task
needs on Modal travel separately, in one of two forms:

* bound to a task (or its function), found by the runner at every submit::

      @modal_options(gpu="A100", memory="32GiB")
      @task
      def train(...): ...

      big_train = modal_options(gpu="H100:2")(train)   # a copy; `train` is unchanged

* around task calls, for everything submitted in the block::

      with modal_options(cpu=8):
          features.submit(df)

* and `modal_options(local=True)` sends a task to the flow's own process
  instead of a sandbox (ZenML's "step operator" hybrid): only the steps that
  need Modal go there.

Precedence, field by field (`SandboxSpec.merged_with`): runner spec, then the
options bound to the task, then enclosing `with` blocks, innermost last.
Values are validated when `modal_options(...)` is called, so a bad GPU name
fails at import or at the `with` line, long before a sandbox exists.

Caveat: `task.with_options(...)` builds a new task from the function, so
options bound to the task *object* (the `modal_options(...)(task)` form) do not
follow it; options bound with the decorator *under* `@task` live on the
function and do.
"""

from __future__ import annotations

import copy
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect_modal.core.spec import SandboxSpec

#: The attribute that carries options on a task or a function.
ATTRIBUTE = "__prefect_modal_options__"

T = TypeVar("T")

_active: ContextVar[tuple[ModalOptions, ...]] = ContextVar("prefect_modal_options", default=())


@dataclass(frozen=True)
class ModalOptions:
    """A validated partial spec plus the local/remote choice; None means "inherit"."""

    spec: SandboxSpec | None = None
    local: bool | None = None
    #: False: a fresh sandbox for every call of the task, never a warm one.
    reuse: bool | None = None

    def over(self, other: ModalOptions | None) -> ModalOptions:
        """`other` laid on top of self (other wins where it says something)."""
        if other is None:
            return self
        spec = (self.spec or SandboxSpec()).merged_with(other.spec) if other.spec else self.spec
        return ModalOptions(
            spec=spec,
            local=other.local if other.local is not None else self.local,
            reuse=other.reuse if other.reuse is not None else self.reuse,
        )


class modal_options:
    """Sandbox options for tasks run by `ModalTaskRunner`: decorator, wrapper or `with` block.

    Args:
        spec: a whole `SandboxSpec` to start from (fields below override it).
        local: True runs the task in the flow's process instead of a sandbox;
            False forces a sandbox even when the runner defaults to local.
        reuse: False gives every call of the task a fresh sandbox even when the
            runner reuses warm sandboxes (strict isolation: no module state,
            files or processes left by an earlier call).
        **fields: any `SandboxSpec` field: gpu="A100", gpu_count=2, cpu=4,
            memory="16GiB", timeout=600, image=..., pip_packages=[...],
            secrets=[...], env={...}, volumes={...}, region=..., cloud=...

    Raises pydantic.ValidationError (with the field, the value and what is
    accepted) at once for a value Modal would refuse.
    """

    def __init__(
        self,
        spec: SandboxSpec | None = None,
        *,
        local: bool | None = None,
        reuse: bool | None = None,
        **fields: Any,
    ):
        if reuse is not None and not isinstance(reuse, bool):
            raise TypeError(f"modal_options(reuse={reuse!r}): reuse must be True or False")
        base = spec.model_dump(exclude_unset=True) if spec is not None else {}
        merged = {**base, **fields}
        self.options = ModalOptions(
            spec=SandboxSpec(**merged) if merged else None, local=local, reuse=reuse
        )
        self._token: Any = None

    # -- as a context manager -------------------------------------------------------

    def __enter__(self) -> modal_options:
        self._token = _active.set((*_active.get(), self.options))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _active.reset(self._token)
            self._token = None

    # -- as a decorator / wrapper ---------------------------------------------------

    def __call__(self, obj: T) -> T:
        """Bind these options to a task (returns a copy) or to a plain function (in place)."""
        from prefect import Task

        if isinstance(obj, Task):
            bound = copy.copy(obj)
            setattr(bound, ATTRIBUTE, bound_options(obj).over(self.options))
            return bound
        if callable(obj):
            setattr(obj, ATTRIBUTE, bound_options(obj).over(self.options))
            return obj
        raise TypeError(
            f"modal_options(...) binds to a task or a function, not {type(obj).__name__}"
        )


def bound_options(obj: Any) -> ModalOptions:
    """Options bound to a task object, else to its function, else none."""
    found = getattr(obj, ATTRIBUTE, None)
    if found is None and hasattr(obj, "fn"):
        found = getattr(obj.fn, ATTRIBUTE, None)
    return found if isinstance(found, ModalOptions) else ModalOptions()


def active_options() -> ModalOptions:
    """The options of every enclosing `with modal_options(...)`, innermost winning."""
    result = ModalOptions()
    for opts in _active.get():
        result = result.over(opts)
    return result


def options_for(task: Any) -> ModalOptions:
    """What applies to one submit of `task`: bound options, then the `with` blocks."""
    return bound_options(task).over(active_options())
