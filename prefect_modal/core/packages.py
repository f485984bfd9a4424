"""Which installed distributions a pickled call needs in its sandbox.

A cloudpickled call names the modules it refers to by reference (a function
imported from numpy, a Prefect logger, a pydantic model class): the sandbox
must import them to load the call.  Modules a function imports in its body
are named in its code.  Both are read here: the module names of the pickle's
global references and the ``import`` statements of the function's code (and
of the user's own functions it refers to), mapped to the installed
distributions that provide them, with their versions in this environment.

The runner adds those to the default image (`SandboxSpec.auto_packages`), and
the bootstrap checks them in a registry image before it loads the call, so a
missing package fails with its name rather than an ImportError half-way
through unpickling.
"""

from __future__ import annotations

import dis
import importlib.metadata
import pickletools
import sys
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

#: Never added: the bootstrap's own needs are in every default image, and our
#: package is not needed remotely (nothing of it is pickled by reference).
_NOT_ADDED = frozenset({"cloudpickle", "prefect-modal", "prefect_modal"})

_dist_lock = threading.Lock()
_module_dists: dict[str, list[str]] | None = None


def _distributions_of() -> dict[str, list[str]]:
    """Top-level module name -> distributions providing it (read once: it scans site-packages)."""
    global _module_dists
    with _dist_lock:
        if _module_dists is None:
            _module_dists = dict(importlib.metadata.packages_distributions())
        return _module_dists


def pickle_modules(payload: bytes) -> set[str]:
    """Top-level names of the modules a pickle refers to by reference.

    Follows the opcodes that push strings (and the memo they are stored in),
    so that ``STACK_GLOBAL`` finds its module name, as `pickle` itself does.
    """
    modules: set[str] = set()
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _pos in pickletools.genops(payload):
            name = op.name
            if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                stack.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo.get(int(arg or 0)))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg or 0)] = stack[-1] if stack else None
            elif name == "STACK_GLOBAL":
                if len(stack) >= 2 and isinstance(stack[-2], str):
                    modules.add(stack[-2].partition(".")[0])
                stack.append(None)
            elif name == "GLOBAL" and isinstance(arg, str):
                modules.add(arg.partition(" ")[0].partition(".")[0])
                stack.append(None)
            else:
                stack.append(None)
            if len(stack) > 64:  # only the last few pushes matter
                del stack[:-16]
    except Exception:  # a truncated or unusual pickle: what was found is still right
        pass
    return modules


def _code_imports(code: types.CodeType, seen: set[int]) -> set[str]:
    if id(code) in seen:
        return set()
    seen.add(id(code))
    found: set[str] = set()
    for instruction in dis.get_instructions(code):
        if instruction.opname == "IMPORT_NAME" and isinstance(instruction.argval, str):
            found.add(instruction.argval.partition(".")[0])
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _code_imports(const, seen)
    return found


def code_modules(fn: Callable[..., Any], user_module: Callable[[str], bool]) -> set[str]:
    """Modules imported in the body of `fn` and of the user's functions it refers to."""
    found: set[str] = set()
    seen: set[int] = set()
    pending: list[Any] = [fn]
    visited: set[int] = set()
    while pending:
        obj = pending.pop()
        obj = getattr(obj, "__wrapped__", obj)
        code = getattr(obj, "__code__", None)
        if not isinstance(code, types.CodeType) or id(obj) in visited:
            continue
        visited.add(id(obj))
        found |= _code_imports(code, seen)
        module = getattr(obj, "__module__", None) or ""
        if module != "__main__" and not user_module(module.partition(".")[0]):
            continue  # an installed library's function: pip brings its own imports
        globals_ = getattr(obj, "__globals__", {})
        cells = [c.cell_contents for c in getattr(obj, "__closure__", None) or () if _full(c)]
        for value in [*(globals_.get(name) for name in code.co_names), *cells]:
            if isinstance(value, types.FunctionType):
                pending.append(value)
            elif isinstance(value, types.ModuleType):
                # cloudpickle sends a module by name (its `subimport`): the sandbox
                # imports it, so its distribution must be there (`_pytest` -> pytest)
                found.add(value.__name__.partition(".")[0])
    return found


def _full(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Requirements:
    """What a call needs remotely: top-level modules, and their distributions pinned."""

    modules: tuple[str, ...]
    pins: tuple[str, ...]

    @property
    def uses_prefect(self) -> bool:
        return "prefect" in self.modules


def requirements(
    modules: Iterable[str], user_module: Callable[[str], bool] | None = None
) -> Requirements:
    """Installed third-party modules among `modules`, and ``dist==version`` for each."""
    stdlib = sys.stdlib_module_names
    dists = _distributions_of()
    kept: set[str] = set()
    pins: set[str] = set()
    for module in modules:
        if not module or module in stdlib or module in sys.builtin_module_names:
            continue
        if module == "__main__" or (user_module is not None and user_module(module)):
            continue
        names = dists.get(module)
        if not names:
            continue  # not from an installed distribution: travels by value or is local
        kept.add(module)
        for dist in names:
            if dist.lower().replace("_", "-") in _NOT_ADDED:
                continue
            try:
                pins.add(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                continue
    return Requirements(modules=tuple(sorted(kept)), pins=tuple(sorted(pins)))


def requirement_name(requirement: str) -> str:
    """``"NumPy[extra]>=1.2"`` -> ``"numpy"``: how pip compares distribution names."""
    name = requirement.strip()
    for sep in ("[", "=", "<", ">", "!", "~", ";", " ", "@"):
        name = name.split(sep, 1)[0]
    return name.lower().replace("_", "-").replace(".", "-")


def missing_pins(pins: Iterable[str], pinned: Iterable[str]) -> list[str]:
    """`pins` whose distribution the user did not list themselves (their choice wins)."""
    have = {requirement_name(p) for p in pinned}
    return [p for p in pins if requirement_name(p) not in have]


def dependency_pins(*roots: str) -> list[str]:
    """``dist==version`` of ``roots`` and everything they require, as installed here.

    Why: an image that installs ``prefect==X`` alone gets the newest versions of
    its dependencies, which need not work with it (constraints.txt pins fastapi
    for that reason); pinning the whole closure to this environment's versions
    gives the sandbox the set that is known to work, on Modal as locally."""
    from packaging.requirements import InvalidRequirement, Requirement

    seen: dict[str, str] = {}
    stack = list(roots)
    while stack:
        name = stack.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        key = requirement_name(dist.metadata["Name"])
        if key in seen:
            continue
        seen[key] = f"{dist.metadata['Name']}=={dist.version}"
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            stack.append(req.name)
    return sorted(seen.values(), key=str.lower)


def pins_for(modules: Iterable[str]) -> list[str]:
    """``dist==version`` of the installed distributions providing `modules`."""
    dists = _distributions_of()
    pins: set[str] = set()
    for module in modules:
        for dist in dists.get(module, ()):
            try:
                pins.add(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                continue
    return sorted(pins)


#: Payloads up to this size are read opcode by opcode (exact, and cheap at this
#: size); the function's own pickle always is.  Larger ones are mostly data, and
#: reading a pickle in Python costs about a microsecond per opcode (a second
#: for a list of 300,000 ints), so their values are sampled by type instead.
EXACT_SCAN_BYTES = 16 * 1024

#: Objects looked at when sampling the types of a call's arguments.
VALUE_SAMPLE = 2000

_fn_cache: dict[Any, frozenset[str]] = {}
_fn_cache_lock = threading.Lock()


def _fn_modules(fn: Callable[..., Any], user_module: Callable[[str], bool]) -> frozenset[str]:
    """Modules the function's pickle and code refer to; cached per function object."""
    import cloudpickle

    with _fn_cache_lock:
        hit = _fn_cache.get(fn)
    if hit is not None:
        return hit
    try:
        found = pickle_modules(cloudpickle.dumps(fn))
    except Exception:  # the whole call's pickle failed earlier or will say why
        found = set()
    modules = frozenset(found | code_modules(fn, user_module))
    with _fn_cache_lock:
        if len(_fn_cache) > 512:
            _fn_cache.clear()
        _fn_cache[fn] = modules
    return modules


def value_modules(
    values: Iterable[Any], limit: int = VALUE_SAMPLE, per_container: int = 64
) -> set[str]:
    """Top-level modules of the types of `values` and of what they hold, breadth first:
    `limit` objects at most, the first `per_container` items of each container (a
    homogeneous list shows its type at once)."""
    from collections import deque
    from itertools import islice

    found: set[str] = set()
    pending: deque[Any] = deque(values)
    seen = 0
    while pending and seen < limit:
        obj = pending.popleft()
        seen += 1
        cls = type(obj)
        if cls in (str, bytes, bytearray, int, float, bool, type(None), complex):
            continue
        for base in getattr(cls, "__mro__", (cls,)):  # a user class by value needs its bases
            module = getattr(base, "__module__", None) or ""
            if module != "builtins":
                found.add(module.partition(".")[0])
        if isinstance(obj, dict):
            for key, value in islice(obj.items(), per_container):
                pending.append(key)
                pending.append(value)
        elif isinstance(obj, list | tuple | set | frozenset):
            pending.extend(islice(obj, per_container))
        elif isinstance(obj, type):
            found.add((obj.__module__ or "").partition(".")[0])
        else:
            state = getattr(obj, "__dict__", None)
            if isinstance(state, dict):
                pending.extend(islice(state.values(), per_container))
    return found


def call_modules(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    payload: bytes,
    user_module: Callable[[str], bool],
) -> set[str]:
    """Top-level modules a pickled call refers to (see `EXACT_SCAN_BYTES`)."""
    modules = set(_fn_modules(fn, user_module))
    if len(payload) <= EXACT_SCAN_BYTES:
        modules |= pickle_modules(payload)
    else:
        modules |= value_modules([*args, *kwargs.values()])
    return modules
