"""``prefect-modal local serve``: run the local Modal server until interrupted.

Prints the ``export`` lines a shell needs (``eval "$(... serve)"`` does not work
since the command keeps running: copy them, or have a parent process read the
``READY <url>`` line that follows them on stdout). SIGINT, SIGTERM and SIGHUP stop the
server and kill every sandbox it started.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from .embedded import LocalModal
from .latency import PRESETS as latency_presets
from .limits import Limits
from .runtime import forkserver
from .runtime import isolation as isolation_mod
from .state import DEFAULT_RETENTION_S

DEFAULT_STATE_DIR = Path("~/.prefect-modal/local")

local_app = typer.Typer(
    name="local",
    help="Run a local, Modal-compatible server whose sandboxes are processes on this machine.",
    no_args_is_help=True,
)


def _load_secrets(path: Path | None) -> dict[str, dict[str, str]]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot read secrets file {str(path)!r}: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) for v in data.values()
    ):
        raise typer.BadParameter(
            f"secrets file {str(path)!r} must be a JSON object of "
            '{"secret-name": {"ENV_VAR": "value", ...}, ...}'
        )
    return data


@local_app.callback()
def _group() -> None:
    """Local Modal server commands (a callback keeps `serve` a subcommand)."""


@local_app.command("serve")
def serve(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 0,
    state_dir: Annotated[
        Path, typer.Option(help="Where sandbox roots, volumes and sandboxes.json live.")
    ] = DEFAULT_STATE_DIR,
    secrets_file: Annotated[
        Path | None,
        typer.Option(
            help='JSON {"secret-name": {"KEY": "value"}} served to modal.Secret.from_name.'
        ),
    ] = None,
    refuse_gpu: Annotated[
        bool,
        typer.Option("--refuse-gpu", help="Fail gpu= requests instead of running them on CPU."),
    ] = False,
    fork_server: Annotated[
        bool,
        typer.Option(
            help="Start `python -c` sandboxes by forking a warm interpreter (fast); "
            "--no-fork-server execs a fresh one each time. Default: on, unless "
            "PREFECT_MODAL_LOCAL_FORK_SERVER=0.",
        ),
    ] = True,
    isolation: Annotated[
        bool,
        typer.Option(
            help="Run each sandbox in Linux namespaces (own root, processes, network when "
            "asked); --no-isolation runs them as plain process groups. Default: on, unless "
            "PREFECT_MODAL_LOCAL_ISOLATION=0.",
        ),
    ] = True,
    host_dir: Annotated[
        list[Path] | None,
        typer.Option(
            help="A host directory every sandbox sees read-only at the same path (repeatable): "
            "the local stand-in for an image holding your code, e.g. a deployment's working "
            "directory. Default: PREFECT_MODAL_LOCAL_HOST_DIRS (os.pathsep-separated).",
        ),
    ] = None,
    retention: Annotated[
        float,
        typer.Option(
            help="Seconds a finished sandbox is kept (record, output, root directory) "
            "before it is pruned; 0 keeps every one until the server stops.",
        ),
    ] = DEFAULT_RETENTION_S,
    latency: Annotated[
        str,
        typer.Option(
            help="'modal' simulates Modal's sandbox start times (a delay drawn from a fit to "
            "ComputeSDK's April 2026 leaderboard: median 2.66 s, p95 11.78 s, p99 22.39 s) "
            "and a 30 ms round trip per RPC, for benchmarks; 'off' (default) adds nothing.",
        ),
    ] = "off",
    create_rate: Annotated[
        float | None,
        typer.Option(
            help="Sandbox creates per second this workspace may make; faster ones fail with "
            "Modal's 'Sandbox creation rate limit exceeded' (ResourceExhaustedError). Modal "
            "publishes no number: off unless set. Default: PREFECT_MODAL_LOCAL_CREATE_RATE.",
        ),
    ] = None,
    max_sandboxes: Annotated[
        int | None,
        typer.Option(
            help="Running sandboxes at once (off unless set; Modal publishes no number). "
            "Default: PREFECT_MODAL_LOCAL_MAX_SANDBOXES.",
        ),
    ] = None,
    max_gpus: Annotated[
        int | None,
        typer.Option(
            help="GPUs held by running sandboxes (off unless set; Modal publishes no number). "
            "Default: PREFECT_MODAL_LOCAL_MAX_GPUS.",
        ),
    ] = None,
    output_window: Annotated[
        int | None,
        typer.Option(
            help="Bytes of each stdout/stderr stream a reader can still get; older output is "
            "dropped as on Modal (64 MiB, an assumption: Modal publishes no size; 0: "
            "unbounded). Default: PREFECT_MODAL_LOCAL_OUTPUT_WINDOW.",
        ),
    ] = None,
    pids_limit: Annotated[
        int | None,
        typer.Option(
            help="Processes and threads one sandbox may have at once, held by cgroups where "
            "this machine allows (1024, an assumption: Modal publishes no number; 0: none). "
            "Default: PREFECT_MODAL_LOCAL_PIDS_LIMIT.",
        ),
    ] = None,
    cgroup_root: Annotated[
        str | None,
        typer.Option(
            help="Where the cgroup file systems that hold sandboxes to their memory, cpu and "
            "pids limits are mounted. Default: PREFECT_MODAL_LOCAL_CGROUP_ROOT, else "
            "/sys/fs/cgroup.",
        ),
    ] = None,
    strict_requests: Annotated[
        bool | None,
        typer.Option(
            help="A sandbox's cpu or memory request without a limit is its limit here "
            "(stricter than Modal, where a container may go above its request when its "
            "worker has room); --no-strict-requests applies Modal's looser rule. Default: "
            "on, unless PREFECT_MODAL_LOCAL_STRICT_REQUESTS=0.",
        ),
    ] = None,
) -> None:
    """Serve Modal's API on 127.0.0.1 until SIGINT, SIGTERM or SIGHUP."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not 0 <= retention < float("inf"):
        raise typer.BadParameter(
            f"{retention:g}: expected seconds >= 0 (0 keeps finished sandboxes until the "
            "server stops)",
            param_hint="'--retention'",
        )
    if latency not in latency_presets:
        raise typer.BadParameter(
            f"{latency!r}: expected one of {', '.join(map(repr, latency_presets))}",
            param_hint="'--latency'",
        )
    for hint, given in (
        ("--create-rate", create_rate),
        ("--max-sandboxes", max_sandboxes),
        ("--max-gpus", max_gpus),
        ("--output-window", output_window),
        ("--pids-limit", pids_limit),
    ):
        if given is not None and not 0 <= given < float("inf"):
            raise typer.BadParameter(f"{given}: expected a number >= 0", param_hint=f"'{hint}'")
    limits = Limits.from_env()
    if create_rate is not None:
        limits.create_rate = create_rate or None
    if max_sandboxes is not None:
        limits.max_sandboxes = max_sandboxes or None
    if max_gpus is not None:
        limits.max_gpus = max_gpus or None
    if output_window is not None:
        limits.output_window = output_window or None
    if pids_limit is not None:
        limits.pids_limit = pids_limit or None
    if cgroup_root:
        limits.cgroup_root = cgroup_root
    if strict_requests is not None:
        limits.strict_requests = strict_requests
    secrets = _load_secrets(secrets_file)
    lm = LocalModal(
        port=port,
        state_dir=state_dir.expanduser(),
        secrets=secrets,
        refuse_gpu=refuse_gpu,
        fork_server=fork_server and forkserver.enabled_by_default(),
        isolation=isolation and isolation_mod.enabled_by_default(),
        host_dirs=host_dir or None,
        retention_s=retention,
        latency=latency,
        limits=limits,
        trust_env=False,  # this process reaches no tunnel; the printed variables are for others
    )
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)  # a closed terminal stops it cleanly too
    lm.start()
    try:
        for key, value in lm.env.items():
            print(f"export {key}={shlex.quote(value)}")
        # tunnels are https://<host> on 443 with a certificate of this server's CA: these make
        # Python's HTTPS clients trust it, and still this machine's CAs for everything else
        for key, value in lm.trust_env.items():
            print(f"export {key}={shlex.quote(value)}")
        print(f"# state: {lm.state_dir}")
        if lm.isolation is not None and lm.isolation.idmap is not None:
            print(f"# isolation: on (Linux namespaces; {lm.isolation.idmap.describe()})")
        elif lm.isolation is not None:
            print("# isolation: on (Linux namespaces; no user namespace: root inside is root)")
        else:
            print(f"# isolation: OFF ({lm.not_isolated_because})")
        if lm.limits_not_enforced_because is None:
            print("# limits: memory, cpu and pids enforced (cgroups)")
        else:
            print(f"# limits: {lm.limits_not_enforced_because}")
        if lm.latency is not None:
            print("# latency: simulated Modal start times and RPC round trips")
        print(f"# CA of tunnels and connect tokens: {lm.tls_cert}")
        print(f"READY {lm.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        lm.stop()
        print("stopped", file=sys.stderr, flush=True)


def main() -> None:
    local_app()
