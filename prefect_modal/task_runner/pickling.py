"""A call's payload: the user's function and arguments, pickled for a sandbox.

The sandbox has the image's packages, not the flow's project: code that is
not installed (the flow's module, a helper next to it, the user's package)
travels by value, everything installed by reference.  Prefect's own
containers are turned into builtin ones on the way, so the sandbox needs no
Prefect to unpickle a map's arguments.
"""

from __future__ import annotations

import os
import pickle
import site
import sys
import sysconfig
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle


def _installed_roots() -> tuple[str, ...]:
    roots = set(site.getsitepackages()) | {site.getusersitepackages()}
    paths = sysconfig.get_paths()
    roots |= {paths.get("stdlib", ""), paths.get("platstdlib", ""), paths.get("purelib", "")}
    roots |= {paths.get("platlib", "")}
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


_INSTALLED = _installed_roots()

#: Never by value, wherever they are installed (an editable checkout of ours, say):
#: pickling the runner's own classes by value would drag its locks and clients
#: into every payload, and breaks Prefect's cloudpickling of the runner itself.
_NEVER_BY_VALUE = frozenset(
    {"prefect_modal", "prefect", "modal", "modal_proto", "cloudpickle", "pytest", "_pytest"}
)
_by_value_lock = threading.Lock()
_by_value_seen: dict[str, bool] = {}
_modules_scanned = 0


def _is_user_module(module: Any) -> bool:
    path = getattr(module, "__file__", None)
    return bool(path) and not os.path.realpath(str(path)).startswith(_INSTALLED)


def register_user_modules() -> None:
    """Pickle the user's own modules by value: everything imported that is not installed.

    Code under site-packages or the standard library is in the image (or must
    be, via pip_packages); anything else (a helper module next to the flow, the
    user's project package, a test module) would fail to import remotely, so
    cloudpickle sends what the call references from it by value.  `__main__`
    is always by value in cloudpickle.  Scans only when new modules appeared.
    """
    global _modules_scanned
    with _by_value_lock:
        if len(sys.modules) == _modules_scanned:
            return
        for name, module in list(sys.modules.items()):
            top = name.partition(".")[0]
            if top in _by_value_seen or top == "__main__" or top in _NEVER_BY_VALUE:
                continue
            if module is None:
                continue
            top_module = sys.modules.get(top)
            user = top_module is not None and _is_user_module(top_module)
            _by_value_seen[top] = user
            if user:
                cloudpickle.register_pickle_by_value(top_module)
        _modules_scanned = len(sys.modules)


_ATOMS = (str, bytes, int, float, bool, type(None))


def plain_containers(value: Any, _path: frozenset[int] = frozenset()) -> Any:
    """`value` with Prefect's own list/tuple/dict subclasses turned into the builtin ones.

    `task.map` returns a `PrefectFutureList`, and Prefect resolves one passed to
    another task into a `PrefectFutureList` *of values*: pickled as it is, the
    sandbox would have to import Prefect (seconds here; on Modal's default
    image, which has no Prefect, an ImportError).  Builtin containers are
    walked (a container that holds itself is left as it is); everything else,
    user subclasses included, travels as it is.
    """
    cls = type(value)
    if cls in _ATOMS or id(value) in _path:
        return value
    if not isinstance(value, list | tuple | dict) or (
        cls not in (list, tuple, dict) and cls.__module__.partition(".")[0] != "prefect"
    ):
        return value
    inner = _path | {id(value)}
    if isinstance(value, dict):
        items = {k: plain_containers(v, inner) for k, v in value.items()}
        unchanged = cls is dict and all(items[k] is v for k, v in value.items())
        return value if unchanged else items
    elements = [plain_containers(v, inner) for v in value]
    base = list if isinstance(value, list) else tuple
    if cls is base and all(a is b for a, b in zip(elements, value, strict=True)):
        return value
    return elements if base is list else tuple(elements)


def is_user_module(top: str) -> bool:
    """True for a top-level module that travels by value (see `register_user_modules`)."""
    return top == "__main__" or _by_value_seen.get(top, False)


def dumps_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: dict[str, Any] | None = None,
) -> bytes:
    """cloudpickle `(fn, args, kwargs[, context])`, the user's modules by value; a clear
    error if it can't."""
    register_user_modules()
    args, kwargs = plain_containers(args), plain_containers(kwargs)
    call: tuple[Any, ...] = (fn, args, kwargs) if context is None else (fn, args, kwargs, context)
    try:
        return cloudpickle.dumps(call, protocol=pickle.DEFAULT_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"{getattr(fn, '__qualname__', fn)!r} and its arguments must be picklable to run "
            f"in a Modal sandbox, but pickling failed: {type(exc).__name__}: {exc}. Pass "
            "plain data (or run this task in the flow's process with modal_options(local=True))."
        ) from exc
