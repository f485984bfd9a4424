"""A local server that speaks Modal's gRPC API; its sandboxes are local processes.

The real ``modal`` client (verified: 1.6.4) runs sandboxes on this machine
through it, like LocalStack for AWS: set ``MODAL_SERVER_URL`` and a token pair
(`LocalModal.env`) or pass `LocalModal.client`. Modules:

* `embedded` - `LocalModal`, the server in a background thread;
* `server` - the RPC handlers (control plane + task command router);
* `runtime` - one sandbox as a process group (and the emulation's limits);
* `processes` - spawning and killing process trees;
* `streams` - replayable output buffers; `fs_tools` - ``sandbox.filesystem``;
* `state` - apps, images, secrets, volumes; `records` - the public listing;
* `auth` - tokens and router JWTs; `ids` - id shapes; `cli` - ``serve``.
"""

from .embedded import LocalModal, make_client
from .records import SandboxRecord, read_listing
from .server import VERIFIED_CLIENT_VERSIONS, ClientVersionWarning

__all__ = [
    "VERIFIED_CLIENT_VERSIONS",
    "ClientVersionWarning",
    "LocalModal",
    "SandboxRecord",
    "make_client",
    "read_listing",
]
