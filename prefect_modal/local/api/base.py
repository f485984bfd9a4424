"""What every room of the API shares: errors, guarding, and the servicer assembly.

No exception may escape a handler: grpclib would send ``UNKNOWN``, which the
client retries silently for seconds, so errors are mapped to NOT_FOUND,
INVALID_ARGUMENT, FAILED_PRECONDITION or ALREADY_EXISTS with a message that
names what was wrong (and never a secret value).
"""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from grpclib import GRPCError, Status
from grpclib.exceptions import StreamTerminatedError
from grpclib.server import Stream

if TYPE_CHECKING:
    from ..state import Registry
    from .context import ServerContext

log = logging.getLogger("prefect_modal.local")

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
T = TypeVar("T")

#: ``created_by`` of what this server makes (Modal names the user or service)
CREATED_BY = "local"


def fail(status: Status, message: str) -> NoReturn:
    raise GRPCError(status, message)


Handler = Callable[[Any, Stream[Any, Any]], Awaitable[None]]


def guarded(fn: Handler) -> Handler:
    """Turn any unexpected exception into FAILED_PRECONDITION (UNKNOWN would be retried)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, stream: Stream[Any, Any]) -> None:
        try:
            await fn(self, stream)
        except (GRPCError, StreamTerminatedError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.warning("local server error in %s: %s", fn.__name__, type(exc).__name__)
            raise GRPCError(
                Status.FAILED_PRECONDITION,
                f"local Modal server error in {fn.__name__}: {type(exc).__name__}",
            ) from None

    return wrapper


#: what a Function or Cls call hears: the local server runs Sandboxes only (docs/local-server.md)
FUNCTIONS_NOT_SERVED = (
    "Modal Functions are not served by the local Modal server (prefect-modal local): "
    "it runs Sandboxes only. Run Functions on Modal, or start a modal.Sandbox instead"
)


def _unimplemented(name: str) -> Handler:
    if name.startswith(("Function", "Class")):
        message = f"{FUNCTIONS_NOT_SERVED} ({name})"
    else:
        message = f"{name} is not implemented by the local Modal server"

    async def handler(self: Any, stream: Stream[Any, Any]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, message)

    handler.__name__ = name
    return handler


def finalize_servicer(cls: type) -> type:
    """Guard every implemented RPC (wherever in the rooms it is defined) and answer
    the rest with UNIMPLEMENTED."""
    rpc_names = {
        name
        for base in cls.__mro__[1:]
        for name, member in vars(base).items()
        if getattr(member, "__isabstractmethod__", False)
    }
    for name in rpc_names:
        impl = getattr(cls, name)
        if getattr(impl, "__isabstractmethod__", False):
            setattr(cls, name, _unimplemented(name))
        elif not hasattr(impl, "__wrapped__"):
            setattr(cls, name, guarded(impl))
    abc.update_abstractmethods(cls)
    return cls


class Room:
    """One area of Modal's API; the servicers are assembled from rooms (see `server`)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.reg: Registry = ctx.registry


#: the page size a listing gets when the request names none (the client's own)
DEFAULT_PAGE_SIZE = 100


def page_of(items: list[T], created_at: Callable[[T], float], pagination: Any) -> list[T]:
    """One page of a named-object listing, as Modal serves it.

    The client (``Volume.objects.list``, ``modal secret list``) asks for at most
    ``max_objects`` items created before ``created_before`` and asks again with
    the last item's ``creation_info.created_at`` until a page is short, so the
    page is newest first and honours both (0 means the default size, never "no
    limit": that would return the same items forever).
    """
    before = pagination.created_before if pagination is not None else 0.0
    limit = (pagination.max_objects if pagination is not None else 0) or DEFAULT_PAGE_SIZE
    ordered = sorted(items, key=created_at, reverse=True)
    if before:
        ordered = [i for i in ordered if created_at(i) < before]
    return ordered[:limit]
