"""Per-task overhead of ModalTaskRunner against Prefect's own task runners.

One run: 50 and 200 trivial tasks (`task.map`) under ThreadPoolTaskRunner,
ProcessPoolTaskRunner and ModalTaskRunner on the local Modal server, each
after one warm-up flow.  Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/bench_task_runner.py [--sizes 50 200] [--repeat 1] [--server embedded|process]

Runners are measured in turn within each repeat (not one after the other), so
a noisy neighbour on the machine affects all of them alike; the best run of
each counts.  `--server process` runs the local Modal server in its own
process (`python -m prefect_modal.local serve`), as `prefect-modal local
serve` does; `embedded` (default) runs it in the flow's process, as the
zero-config path does.

Runs against Prefect's test harness (a temporary API server) unless
PREFECT_API_URL is set, and an embedded local Modal server; HOME is isolated
so no ~/.modal.toml is read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

_home = tempfile.mkdtemp(prefix="bench-home-")
os.environ["HOME"] = _home
os.environ["MODAL_CONFIG_PATH"] = str(Path(_home) / ".modal.toml")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(Path(_home) / ".prefect"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
for _key in [k for k in os.environ if k.startswith("MODAL_") and k != "MODAL_CONFIG_PATH"]:
    del os.environ[_key]

from prefect import flow, task  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner  # noqa: E402

from prefect_modal import ModalCredentials, ModalTaskRunner  # noqa: E402
from prefect_modal.local import LocalModal  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@task
def trivial(i: int) -> int:
    return i + 1


def run_once(runner, n: int) -> float:
    @flow(task_runner=runner, log_prints=False)
    def bench_flow(n: int) -> int:
        return sum(trivial.map(range(n)).result())

    started = time.perf_counter()
    total = bench_flow(n)
    elapsed = time.perf_counter() - started
    assert total == sum(range(1, n + 1)), total
    return elapsed


@contextmanager
def _local_server(kind: str) -> Iterator[dict[str, str]]:
    """MODAL_SERVER_URL and tokens of a local Modal server, embedded or in a process."""
    if kind == "embedded":
        with LocalModal() as lm:
            yield dict(lm.env)
        return
    state = tempfile.mkdtemp(prefix="bench-modal-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect_modal.local", "serve", "--port", "0", "--state-dir", state],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        env: dict[str, str] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("export "):
                key, _, value = line[len("export ") :].strip().partition("=")
                env[key] = shlex.split(value)[0]
            if line.startswith("READY "):
                break
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--server", choices=["embedded", "process"], default="embedded")
    args = parser.parse_args()

    with ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):
            from prefect.testing.utilities import prefect_test_harness

            stack.enter_context(prefect_test_harness(server_startup_timeout=60))
        env = stack.enter_context(_local_server(args.server))
        creds = ModalCredentials(
            token_id=env["MODAL_TOKEN_ID"],
            token_secret=env["MODAL_TOKEN_SECRET"],
            server_url=env["MODAL_SERVER_URL"],
        )
        runners = {
            "ThreadPoolTaskRunner": lambda: ThreadPoolTaskRunner(),
            "ProcessPoolTaskRunner": lambda: ProcessPoolTaskRunner(),
            f"ModalTaskRunner (local, {args.server})": lambda: ModalTaskRunner(credentials=creds),
        }
        for make in runners.values():
            run_once(make(), 5)  # warm-up: imports, pools, image and app lookups
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeat):
            for n in args.sizes:
                for name, make in runners.items():
                    elapsed = run_once(make(), n)
                    times.setdefault((name, n), []).append(elapsed)
                    print(f"  {name:34s} {n:4d} tasks  {elapsed:7.2f} s", flush=True)
        rows = []
        for (name, n), runs in times.items():
            best = min(runs)
            rows.append(
                {
                    "runner": name,
                    "tasks": n,
                    "wall_s": round(best, 3),
                    "per_task_ms": round(1000 * best / n, 1),
                    "runs": [round(t, 3) for t in runs],
                }
            )

    rows.sort(key=lambda r: (r["tasks"], list(runners).index(r["runner"])))
    by = {(r["runner"], r["tasks"]): r for r in rows}
    print()
    header = (
        f"{'runner':34s} {'tasks':>5s} {'wall s':>8s} {'ms/task':>8s} "
        f"{'vs thread':>10s} {'vs process':>11s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        thread = by[("ThreadPoolTaskRunner", r["tasks"])]["wall_s"]
        process = by[("ProcessPoolTaskRunner", r["tasks"])]["wall_s"]
        r["ratio_vs_thread"] = round(r["wall_s"] / thread, 2)
        r["speedup_vs_process"] = round(process / r["wall_s"], 2)
        print(
            f"{r['runner']:34s} {r['tasks']:5d} {r['wall_s']:8.2f} {r['per_task_ms']:8.1f} "
            f"{r['ratio_vs_thread']:9.2f}x {r['speedup_vs_process']:10.2f}x"
        )

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"task_runner-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "task_runner",
                "when": stamp,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "argv": sys.argv[1:],
                "server": args.server,
                "load_average_at_end": os.getloadavg(),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
