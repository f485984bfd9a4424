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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PREFECT = str(Path(sys.executable).parent / "prefect")

FLOW_SOURCE = """
from prefect import flow


@flow
def trivial() -> int:
    print("trivial flow ran")
    return 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MODAL_"))}
    env.update(
        HOME=str(home),
        MODAL_CONFIG_PATH=str(home / ".modal.toml"),
        PREFECT_HOME=str(home / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    return env


class Processes:
    """Everything started here, stopped by pid (process group) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(
        self, args: list[str], env: dict[str, str], log: Path, **kw: Any
    ) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(
            args,
            env=env,
            stdout=kw.pop("stdout", log.open("wb")),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kw,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs per worker")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) for a look")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    (work / "flows").mkdir()
    (work / "flows" / "trivial.py").write_text(FLOW_SOURCE)
    procs = Processes()
    try:
        # Prefect server
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        server_env = clean_env(work / "server") | {
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{work}/prefect.db",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        server = procs.start(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            server_env,
            work / "server.log",
        )
        wait_until(lambda: _healthy(f"{api_url}/health", server), 180, "the Prefect server")

        # Local Modal server (standalone, as a user would run it)
        modal_proc = procs.start(
            [
                sys.executable,
                "-m",
                "prefect_modal.local",
                "serve",
                "--port",
                "0",
                "--state-dir",
                str(work / "modal-state"),
            ],
            clean_env(work / "modal"),
            work / "modal.log",
            stdout=subprocess.PIPE,
            text=True,
        )
        modal_env: dict[str, str] = {}
        assert modal_proc.stdout is not None
        for line in modal_proc.stdout:
            if line.startswith("export "):
                key, _, value = line[7:].strip().partition("=")
                modal_env[key] = value.strip("'")
            if line.startswith("READY"):
                break

        os.environ["PREFECT_API_URL"] = api_url
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate

        from prefect_modal.worker import ModalWorker

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
            log = home / "worker.log"
            procs.start(
                [PREFECT, "worker", "start", "--pool", f"bench-{pool}", "--type", pool],
                clean_env(home) | worker_env | extra,
                log,
                cwd=str(home),
            )
            wait_until(
                lambda log=log: "started!" in log.read_text(errors="replace"),
                120,
                f"the {pool} worker",
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
        procs.stop_all()
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _healthy(url: str, proc: subprocess.Popen[Any]) -> bool:
    if proc.poll() is not None:
        raise RuntimeError("the Prefect server exited")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


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
