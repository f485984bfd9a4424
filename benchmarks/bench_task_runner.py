"""Per-task overhead of ModalTaskRunner against Prefect's own task runners.

One run: 50 and 200 trivial tasks (`task.map`) under ThreadPoolTaskRunner,
ProcessPoolTaskRunner and ModalTaskRunner on the local Modal server, warm
(`reuse_sandboxes=True`, the default) and cold (`reuse_sandboxes=False`),
each after one warm-up flow, all at a parallelism of 16.  With `--latency
both` (default) the ModalTaskRunner rows are repeated against a local server
with the Modal-like latency model (`LocalModal(latency="modal")`: start delays
drawn from a fit to ComputeSDK's April 2026 figures for Modal, and a round
trip per RPC; a simulation, see `prefect_modal/local/latency.py`).  Then one
1,000-task map, warm: flow-process RSS before and after, sandboxes left
running.  Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/bench_task_runner.py [--sizes 50 200] [--repeat 1]
        [--server both|embedded|process] [--latency both|off|modal] [--big 1000]
        [--quiet-wait 60] [--out PATH] [--smoke]

`--smoke` is 2 tasks per map, one run, no warm-up, a 4-task big map and no
wait for a quiet machine: it checks that the benchmark works (every runner it
would measure), its figures mean nothing.

Two times per run:

* **wall**: the flow call, start to return (what the issue's targets are about);
* **settled**: until the Prefect API shows every task run of that flow run
  Completed.  Task states reach the API as events that the server records
  after the fact; a runner whose flow returns quickly leaves that work to run
  after its own wall time (and into the next run's, if nothing waited).  Each
  run starts on a quiet machine (see `wait_until_quiet`).

Runners are measured in turn within each repeat (not one after the other), so
a noisy neighbour on the machine affects all of them alike; the best run of
each counts.  The local Modal server runs in the flow's process (`embedded`,
the zero-config path) and/or in its own process (`process`, as `prefect-modal
local serve` does); `both` measures both; `embedded` is the default.

Runs against Prefect's test harness (a temporary API server) unless
PREFECT_API_URL is set; HOME is isolated so no ~/.modal.toml is read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from bench_common import scratch_dir

# A process pool's worker runs this module again (as __mp_main__): it inherits
# this environment, and must not make (and leave behind) a HOME of its own.
if __name__ != "__mp_main__":
    _home = scratch_dir("bench-home-")
    os.environ["HOME"] = str(_home)
    os.environ["MODAL_CONFIG_PATH"] = str(_home / ".modal.toml")
    os.environ.setdefault("PREFECT_HOME", str(_home / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
for _key in [k for k in os.environ if k.startswith("MODAL_") and k != "MODAL_CONFIG_PATH"]:
    del os.environ[_key]

from prefect import flow, task  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner  # noqa: E402

from prefect_modal import ModalCredentials, ModalTaskRunner  # noqa: E402
from prefect_modal.cli.services import start_local_modal  # noqa: E402
from prefect_modal.local import LocalModal  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@task
def trivial(i: int) -> int:
    return i + 1


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _proc_cpu_s(pid: int | str) -> float:
    """utime + stime (+ reaped children's) of one process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of this (flow) process, which includes the embedded local Modal
    server, and of its child processes by kind: the Prefect API server (the test
    harness's uvicorn) and everything else (sandboxes, the local runtime's helpers)."""
    me = os.getpid()
    out = {"flow_process": _proc_cpu_s(me), "prefect_server": 0.0, "sandboxes_and_helpers": 0.0}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read()
        except OSError:
            continue
        kind = "prefect_server" if "uvicorn" in cmd else "sandboxes_and_helpers"
        out[kind] += _proc_cpu_s(pid)
    return out


def run_once(runner, n: int) -> tuple[float, float]:
    """(wall, settled) seconds of one flow run of `n` trivial tasks."""

    @flow(task_runner=runner, log_prints=False)
    def bench_flow(n: int) -> int:
        return sum(trivial.map(range(n)).result())

    started = time.perf_counter()
    state = bench_flow(n, return_state=True)
    elapsed = time.perf_counter() - started
    total = state.result()
    assert total == sum(range(1, n + 1)), total
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 300
        while _completed_task_runs(client, flow_run_id) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"task runs of {flow_run_id} did not all complete in 300 s")
            time.sleep(0.05)
    return elapsed, time.perf_counter() - started


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def wait_until_quiet(busy_below: float = 0.1, window: float = 0.5, limit: float = 60.0) -> float:
    """Wait until the machine is idle (the Prefect server done with earlier runs' events).

    Without it a run pays for the work its predecessor left behind; returns
    the seconds waited.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit:
        busy0, total0 = _cpu_ticks()
        time.sleep(window)
        busy1, total1 = _cpu_ticks()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy_below:
            break
    return time.monotonic() - started


def _completed_task_runs(client, flow_run_id) -> int:
    body = {
        "flow_runs": {"id": {"any_": [str(flow_run_id)]}},
        "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
    }
    return int(client.request("POST", "/task_runs/count", json=body).json())


@contextmanager
def _local_server(kind: str, latency: str = "off") -> Iterator[dict[str, str]]:
    """MODAL_SERVER_URL and tokens of a local Modal server, embedded or in a process."""
    if kind == "embedded":
        with LocalModal(latency=latency) as lm:
            _servers[latency] = lm
            yield dict(lm.env)
        return
    service = start_local_modal(scratch_dir("bench-modal-"))
    try:
        yield dict(service.env)
    finally:
        service.stop()


_servers: dict[str, LocalModal] = {}

#: Task-level parallelism of every runner (the issue's setting).
PARALLELISM = 16


def _big_map(runner: ModalTaskRunner, n: int, server: LocalModal) -> dict[str, float | int]:
    """One warm n-task map: flow-process RSS before and after, sandboxes left running."""
    before = _rss_mib()
    wall, settled = run_once(runner, n)
    after = _rss_mib()
    left = sum(1 for s in server.sandboxes() if s.status == "running")
    return {
        "tasks": n,
        "wall_s": round(wall, 3),
        "settled_s": round(settled, 3),
        "rss_before_mib": round(before, 1),
        "rss_after_mib": round(after, 1),
        "rss_growth_mib": round(after - before, 1),
        "sandboxes_left_running": left,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--server", choices=["both", "embedded", "process"], default="embedded")
    parser.add_argument("--latency", choices=["both", "off", "modal"], default="both")
    parser.add_argument("--big", type=int, default=1000, help="tasks of the RSS map (0: skip)")
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="most seconds to wait for an idle machine"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: benchmarks/results/, stamped)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny maps, one run, no waits: does it work?"
    )
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.repeat, args.big, args.quiet_wait = [2], 1, min(args.big, 4), 0.0
    latencies = ["off", "modal"] if args.latency == "both" else [args.latency]
    servers = ["embedded", "process"] if args.server == "both" else [args.server]

    with ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):
            from prefect.testing.utilities import prefect_test_harness

            stack.enter_context(prefect_test_harness(server_startup_timeout=60))
        runners = {
            "ThreadPoolTaskRunner": lambda: ThreadPoolTaskRunner(max_workers=PARALLELISM),
            "ProcessPoolTaskRunner": lambda: ProcessPoolTaskRunner(max_workers=PARALLELISM),
        }
        warm_creds = None
        for latency in latencies:
            for kind in servers if latency == "off" else ["embedded"]:
                env = stack.enter_context(_local_server(kind, latency))
                creds = ModalCredentials(
                    token_id=env["MODAL_TOKEN_ID"],
                    token_secret=env["MODAL_TOKEN_SECRET"],
                    server_url=env["MODAL_SERVER_URL"],
                )
                if latency == "off" and kind == "embedded":
                    warm_creds = creds
                where = kind if latency == "off" else f"{kind}, modal latency"
                for mode, reuse in (("warm", True), ("cold", False)):
                    runners[f"Modal {mode} ({where})"] = lambda c=creds, r=reuse: ModalTaskRunner(
                        credentials=c, max_parallelism=PARALLELISM, reuse_sandboxes=r
                    )
        for name, make in runners.items():
            if not args.smoke and ("modal latency" not in name or "warm" in name):
                run_once(make(), 5)  # warm-up: imports, pools, image and app lookups
        times: dict[tuple[str, int], list[tuple[float, float]]] = {}
        #: CPU seconds per process during the (last) run, until settled
        cpu: dict[tuple[str, int], dict[str, float]] = {}
        for _ in range(args.repeat):
            for n in args.sizes:
                for name, make in runners.items():
                    wait_until_quiet(limit=args.quiet_wait)
                    cpu_before = _cpu_by_process()
                    wall, settled = run_once(make(), n)
                    cpu_after = _cpu_by_process()
                    times.setdefault((name, n), []).append((wall, settled))
                    cpu[(name, n)] = {k: round(cpu_after[k] - v, 2) for k, v in cpu_before.items()}
                    print(
                        f"  {name:40s} {n:4d} tasks  {wall:7.2f} s  (settled {settled:6.2f} s)",
                        flush=True,
                    )
        big = None
        if args.big and warm_creds is not None and "off" in _servers:
            wait_until_quiet(limit=args.quiet_wait)
            big = _big_map(
                ModalTaskRunner(credentials=warm_creds, max_parallelism=PARALLELISM),
                args.big,
                _servers["off"],
            )
            print(f"  big map: {big}", flush=True)
        rows = []
        for (name, n), runs in times.items():
            wall = min(r[0] for r in runs)
            settled = min(r[1] for r in runs)
            rows.append(
                {
                    "runner": name,
                    "tasks": n,
                    "wall_s": round(wall, 3),
                    "per_task_ms": round(1000 * wall / n, 1),
                    "settled_s": round(settled, 3),
                    "runs": [[round(w, 3), round(s, 3)] for w, s in runs],
                    "cpu_s": cpu.get((name, n)),
                }
            )

    rows.sort(key=lambda r: (r["tasks"], list(runners).index(r["runner"])))
    by = {(r["runner"], r["tasks"]): r for r in rows}
    print()
    header = (
        f"{'runner':40s} {'tasks':>5s} {'wall s':>7s} {'ms/task':>8s} {'vs thread':>10s} "
        f"{'vs process':>11s} {'settled s':>10s} {'vs thread':>10s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        thread = by[("ThreadPoolTaskRunner", r["tasks"])]
        process = by[("ProcessPoolTaskRunner", r["tasks"])]
        r["ratio_vs_thread"] = round(r["wall_s"] / thread["wall_s"], 2)
        r["speedup_vs_process"] = round(process["wall_s"] / r["wall_s"], 2)
        r["settled_ratio_vs_thread"] = round(r["settled_s"] / thread["settled_s"], 2)
        print(
            f"{r['runner']:40s} {r['tasks']:5d} {r['wall_s']:7.2f} {r['per_task_ms']:8.1f} "
            f"{r['ratio_vs_thread']:9.2f}x {r['speedup_vs_process']:10.2f}x "
            f"{r['settled_s']:10.2f} {r['settled_ratio_vs_thread']:9.2f}x"
        )

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"task_runner-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
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
                "smoke": args.smoke,
                "servers": servers,
                "load_average_at_end": os.getloadavg(),
                "rows": rows,
                "big_map": big,
                "warm_vs_cold": _warm_vs_cold(rows),
            },
            indent=2,
        )
    )
    for line in _warm_vs_cold(rows):
        print(line)
    print(f"\nwrote {out}")


def _warm_vs_cold(rows: list[dict]) -> list[str]:
    """How much faster warm is than cold, per server and size."""
    by = {(r["runner"], r["tasks"]): r for r in rows}
    lines = []
    for (name, n), warm in by.items():
        if not name.startswith("Modal warm"):
            continue
        cold = by.get((name.replace("warm", "cold", 1), n))
        if cold:
            lines.append(
                f"{name.replace('Modal warm ', '')} {n} tasks: warm is "
                f"{cold['wall_s'] / warm['wall_s']:.1f}x faster than cold (wall), "
                f"{cold['settled_s'] / warm['settled_s']:.1f}x (settled)"
            )
    return lines


if __name__ == "__main__":
    main()
