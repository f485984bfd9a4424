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
from typing import TYPE_CHECKING, Any, NoReturn

from grpclib import GRPCError, Status
from grpclib.exceptions import StreamTerminatedError
from grpclib.server import Stream

if TYPE_CHECKING:
    from ..state import Registry
    from .context import ServerContext

log = logging.getLogger("prefect_modal.local")

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


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


def _unimplemented(name: str) -> Handler:
    async def handler(self: Any, stream: Stream[Any, Any]) -> None:
        raise GRPCError(
            Status.UNIMPLEMENTED, f"{name} is not implemented by the local Modal server"
        )

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
