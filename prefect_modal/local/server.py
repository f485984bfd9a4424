"""The gRPC servicers: Modal's control plane and task command router on one port.

The real modal client (1.6.4) talks to this server unchanged. The handlers
live in rooms by Modal's own areas (`api`); this module only assembles them
into the two services grpclib serves. Every RPC the rooms do not implement
answers ``UNIMPLEMENTED``; every one they do is guarded (see `api.base`).

Authentication: control-plane calls must carry the server's token pair; router
calls must carry a JWT this server minted for the task they name (see `auth`).
"""

from __future__ import annotations

from modal_proto.api_grpc import ModalClientBase
from modal_proto.task_command_router_grpc import TaskCommandRouterBase

from .api.apps import Apps
from .api.base import finalize_servicer
from .api.context import VERIFIED_CLIENT_VERSIONS, ClientVersionWarning, ServerContext
from .api.images import Images
from .api.mounts import Mounts
from .api.router import CommandRouter
from .api.sandboxes import Sandboxes
from .api.secrets import Secrets
from .api.snapshots import ImageMounts, Snapshots
from .api.tasks import Tasks
from .api.tunnels import Tunnels
from .api.volumes import Volumes


@finalize_servicer
class ControlPlane(
    Apps, Images, Mounts, Secrets, Volumes, Sandboxes, Tasks, Tunnels, ModalClientBase
):
    """The ``modal.client.ModalClient`` service, as far as sandboxes and Modal's CLI need it."""


@finalize_servicer
class Router(CommandRouter, Snapshots, ImageMounts, TaskCommandRouterBase):
    """The task command router: V2 stdio and every sandbox's ``exec``."""


__all__ = [
    "VERIFIED_CLIENT_VERSIONS",
    "ClientVersionWarning",
    "ControlPlane",
    "Router",
    "ServerContext",
]
