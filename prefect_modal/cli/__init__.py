"""`prefect-modal`, the command line (Typer, rich tables), and what it starts.

* `app` - the commands: status, logs, cancel, cost, ``local``, ``pool``;
* `pool` - ``prefect-modal pool ...``: work pool storage;
* `demo` - ``prefect-modal demo``: the main job;
* `services` - Prefect and local Modal servers, a worker: started and stopped
  by pid (the demo and the tests use them).
"""

from prefect_modal.cli.app import app

__all__ = ["app"]
