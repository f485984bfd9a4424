"""Flow run latency: ModalWorker on the local Modal server against Prefect's `process` worker.

What is measured: for the same trivial flow, deployed twice with the same pull
step (one deployment per pool), the wall time from creating the flow run from
the deployment (what `prefect deployment run` does, without the CLI's own ~3 s
start, which would be the same for both and hide the difference) until the API
reports it Completed.  Both workers poll every second (PREFECT_WORKER_QUERY_SECONDS=1)
and run on this machine; runs alternate between the two pools so that drift in
machine load hits both alike.  Target: modal / process <= 1.2 (median).

The flow's directory reaches the sandboxes as the README tells users: the
local Modal server (`prefect-modal local serve`) is started with
`--host-dir <flow directory>`, so its isolated sandboxes see that directory
read-only at the same path and the deployment's `set_working_directory` pull
step finds it (on Modal a `git_clone` step or an image would carry the code).

Run:  python benchmarks/bench_worker.py [--runs 5] [--out PATH] [--smoke]
Prints a table and writes benchmarks/results/worker-<UTC time>.json (or --out).
`--smoke` is one run per worker and no warm-up: it checks that the benchmark
works, its times mean nothing.  Every process it starts is stopped by pid at
the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect_modal.cli.services import (
    Service,
    isolated_env,
    spawn,
    start_local_modal,
    start_prefect_server,
    tool,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

FLOW_SOURCE = """
from prefect import flow


@flow
def trivial() -> int:
    print("trivial flow ran")
    return 1
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs per worker")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) for a look")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: benchmarks/results/, stamped)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="one run per worker, no warm-up: does it work?"
    )
    args = parser.parse_args()
    if args.smoke:
        args.runs = 1
    out = args.out or RESULTS / f"worker-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    load_at_start = os.getloadavg()

    work = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    (work / "flows").mkdir()
    (work / "flows" / "trivial.py").write_text(FLOW_SOURCE)
    services: list[Service] = []  # everything started here, stopped by pid at the end
    cleanup = ExitStack()
    try:
        server_env = isolated_env(work / "server") | {
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{work}/prefect.db",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        server = start_prefect_server(work / "server", timeout=180, ui=False, base=server_env)
        services.append(server)
        assert server.url is not None
        api_url = server.url

        # Local Modal server (standalone, as a user would run it), showing the flow's
        # directory to its isolated sandboxes: `prefect-modal local serve --host-dir DIR`.
        modal = start_local_modal(
            work / "modal-state",
            timeout=60,
            env=isolated_env(work / "modal"),
            host_dirs=[work / "flows"],
        )
        services.append(modal)
        modal_env = modal.env

        # prefect_modal imported prefect, which read its settings then, before this URL
        # was known: point this process's clients at the server explicitly.
        os.environ["PREFECT_API_URL"] = api_url
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        cleanup.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
        from prefect.client.schemas.actions import WorkPoolCreate

        from prefect_modal.worker.worker import ModalWorker

        with get_client(sync_client=True) as client:
            client.create_work_pool(
                WorkPoolCreate(
                    name="bench-modal",
                    type="modal",
                    base_job_template=ModalWorker.get_default_base_job_template(),
                )
            )
            from prefect.workers.process import ProcessWorker

            client.create_work_pool(
                WorkPoolCreate(
                    name="bench-process",
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
            flow_id = client.create_flow_from_name("trivial")
            pull = [
                {
                    "prefect.deployments.steps.set_working_directory": {
                        "directory": str(work / "flows")
                    }
                }
            ]
            deployments = {
                pool: client.create_deployment(
                    flow_id=flow_id,
                    name=pool,
                    entrypoint="trivial.py:trivial",
                    work_pool_name=f"bench-{pool}",
                    pull_steps=pull,
                )
                for pool in ("modal", "process")
            }

        worker_env = {
            "PREFECT_API_URL": api_url,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        }
        for pool, extra in (("modal", modal_env), ("process", {})):
            home = work / f"worker-{pool}"
            home.mkdir()
            worker = spawn(
                "worker",
                [tool("prefect"), "worker", "start", "--pool", f"bench-{pool}", "--type", pool],
                isolated_env(home) | worker_env | extra,
                home,
                cwd=home,
            )
            services.append(worker)
            wait_ready(
                worker,
                lambda w=worker: "started!" in w.log_path.read_text(errors="replace"),
                120,
                "start polling its work pool",
            )

        timings: dict[str, list[float]] = {"modal": [], "process": []}
        with get_client(sync_client=True) as client:
            if not args.smoke:
                for pool in ("modal", "process"):  # warm-up: first imports, first app lookup
                    _time_run(client, deployments[pool])
            for _ in range(args.runs):
                for pool in ("modal", "process"):
                    timings[pool].append(_time_run(client, deployments[pool]))

        report(timings, args, out, load_at_start)
    finally:
        cleanup.close()
        for service in reversed(services):
            service.stop(timeout=20)
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _time_run(client: Any, deployment_id: Any) -> float:
    started = time.monotonic()
    run = client.create_flow_run_from_deployment(deployment_id)
    while True:
        state = client.read_flow_run(run.id).state
        if state is not None and state.is_final():
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    if not state.is_completed():
        raise RuntimeError(f"benchmark run {run.id} ended {state.name}: {state.message}")
    return elapsed


def report(
    timings: dict[str, list[float]],
    args: argparse.Namespace,
    out: Path,
    load_at_start: tuple[float, float, float],
) -> None:
    """Print the table and write the JSON (every run's time, the load average around them)."""
    med = {k: statistics.median(v) for k, v in timings.items()}
    ratio = med["modal"] / med["process"]
    rows = [
        ("worker", "median s", "min s", "max s", "runs"),
        *[
            (k, f"{med[k]:.2f}", f"{min(v):.2f}", f"{max(v):.2f}", str(len(v)))
            for k, v in timings.items()
        ],
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    verdict = ("meets" if ratio <= 1.2 else "misses") + " the 1.2 target"
    if args.smoke:
        verdict = "a smoke run: its times mean nothing"
    print(f"\nratio modal/process (median): {ratio:.2f} ({verdict})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "deployment run -> Completed, trivial flow",
                "measured_from": (
                    "create_flow_run_from_deployment (what `prefect deployment run` calls)"
                ),
                "workers": {
                    "modal": "ModalWorker, local Modal server",
                    "process": "Prefect ProcessWorker",
                },
                "argv": sys.argv[1:],
                "smoke": args.smoke,
                "runs_per_worker": args.runs,
                "seconds": timings,
                "median_seconds": med,
                "ratio_modal_over_process": ratio,
                "target_ratio": 1.2,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "load_average": {"at_start": load_at_start, "at_end": os.getloadavg()},
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
