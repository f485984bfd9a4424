"""Flow run latency: ModalWorker on the local Modal server against Prefect's `process` worker.

What is measured: for the same trivial flow, deployed twice with the same pull
step (one deployment per pool), the wall time from creating the flow run from
the deployment (what `prefect deployment run` does, without the CLI's own ~3 s
start, which would be the same for both and hide the difference) until the API
reports it Completed.  Both workers poll every second (PREFECT_WORKER_QUERY_SECONDS=1)
and run on this machine; runs alternate between the two pools so that drift in
machine load hits both alike.  Target: modal / process <= 1.2 (median).

Run:  python benchmarks/bench_worker.py [--runs 5]
Prints a table and writes benchmarks/results/bench_worker.json.
Every process it starts is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
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
    args = parser.parse_args()

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

        # Local Modal server (standalone, as a user would run it)
        modal = start_local_modal(
            work / "modal-state", timeout=60, env=isolated_env(work / "modal")
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
            for pool in ("modal", "process"):  # warm-up: first imports, first app lookup
                _time_run(client, deployments[pool])
            for _ in range(args.runs):
                for pool in ("modal", "process"):
                    timings[pool].append(_time_run(client, deployments[pool]))

        report(timings, args.runs)
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


def report(timings: dict[str, list[float]], runs: int) -> None:
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
    verdict = "meets" if ratio <= 1.2 else "misses"
    print(f"\nratio modal/process (median): {ratio:.2f} ({verdict} the 1.2 target)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_worker.json"
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
                "runs_per_worker": runs,
                "seconds": timings,
                "median_seconds": med,
                "ratio_modal_over_process": ratio,
                "target_ratio": 1.2,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
