"""A local server that speaks Modal's gRPC API; its sandboxes are local containers.

The real ``modal`` client (verified: 1.6.4) runs sandboxes on this machine
through it, like LocalStack for AWS: set ``MODAL_SERVER_URL`` and a token pair
(`LocalModal.env`) or pass `LocalModal.client`. Modules:

* `embedded` - `LocalModal`, the server in a background thread;
* `server` - the two gRPC services, assembled from the rooms of `api` (by Modal area);
* `runtime` - how a sandbox runs here: `sandbox`, its container (`isolation` on
  the server's side, `container` in the forked child), `processes`,
  `forkserver` and `zygote`, `streams`, probes, and tunnels (`tunnels`, each on a
  host of its own on port 443 by `tunnel_hosts`, with certificates of the server's
  CA by `tls`, which also makes clients trust it);
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
