"""Benchmark the local Modal server against running the same command bare.

Measures, through the real modal client:

* create -> wait -> read stdout of ``python -c "print(1)"`` (median of N runs)
  against ``subprocess.run`` of the same command; the target ratio is <= 1.5;
* wall time of 50 sandboxes run at once, against 50 bare processes at once;

each for the server's default (``python -c`` sandboxes forked from a warm
interpreter, `prefect_modal.local.runtime.forkserver`) and with the fork server off
(every sandbox a fresh ``exec``), side by side in one run.

Usage: ``python benchmarks/bench_local_server.py [--repeats 20] [--concurrency 50]
[--out benchmarks/results/local_server.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CMD = ["python", "-c", "print(1)"]
TARGET_RATIO = 1.5


def _isolate_modal_config() -> None:
    home = tempfile.mkdtemp(prefix="bench-home-")
    os.environ["HOME"] = home
    os.environ["MODAL_CONFIG_PATH"] = str(Path(home) / ".modal.toml")
    for key in list(os.environ):
        if key.startswith("MODAL_") and key != "MODAL_CONFIG_PATH":
            del os.environ[key]


def bench_bare(repeats: int) -> list[float]:
    argv = [sys.executable, *CMD[1:]]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        times.append(time.perf_counter() - t0)
        assert out == "1\n"
    return times


def bench_sandbox(lm: Any, app: Any, repeats: int) -> list[float]:
    import modal

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sb = modal.Sandbox.create(*CMD, app=app, client=lm.client)
        sb.wait()
        out = sb.stdout.read()
        times.append(time.perf_counter() - t0)
        assert out == "1\n" and sb.returncode == 0
    return times


def bench_concurrent_sandboxes(lm: Any, app: Any, n: int) -> float:
    import modal

    async def one() -> None:
        sb = await modal.Sandbox.create.aio(*CMD, app=app, client=lm.client)
        await sb.wait.aio()
        assert await sb.stdout.read.aio() == "1\n"

    async def all_of_them() -> None:
        await asyncio.gather(*(one() for _ in range(n)))

    t0 = time.perf_counter()
    asyncio.run(all_of_them())
    return time.perf_counter() - t0


def bench_concurrent_bare(n: int) -> float:
    argv = [sys.executable, *CMD[1:]]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(n)]
    for p in procs:
        p.communicate()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/local_server.json"))
    args = parser.parse_args()
    _isolate_modal_config()

    import modal

    from prefect_modal.local import LocalModal

    modes = {"fork server": True, "exec": False}
    servers = {name: LocalModal(fork_server=on).start() for name, on in modes.items()}
    try:
        apps = {
            name: modal.App.lookup("bench", create_if_missing=True, client=lm.client)
            for name, lm in servers.items()
        }
        for name, lm in servers.items():
            bench_sandbox(lm, apps[name], 3)  # warm up: imports, connections, the zygote
        time.sleep(1.0)  # the zygote starts in the background on first use
        bench_bare(3)
        bare: list[float] = []
        sandbox: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.repeats):  # interleave, so drift hits all alike
            bare += bench_bare(1)
            for name, lm in servers.items():
                sandbox[name] += bench_sandbox(lm, apps[name], 1)
        conc_bare = bench_concurrent_bare(args.concurrency)
        conc_sandbox = {
            name: bench_concurrent_sandboxes(lm, apps[name], args.concurrency)
            for name, lm in servers.items()
        }
        left = [r for lm in servers.values() for r in lm.sandboxes() if r.status == "running"]
    finally:
        for lm in servers.values():
            lm.stop()

    bare_med = statistics.median(bare)
    med = {name: statistics.median(times) for name, times in sandbox.items()}
    default = "fork server"
    result = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "modal_version": modal.__version__,
        "repeats": args.repeats,
        "command": CMD,
        "bare_subprocess_run_median_s": bare_med,
        "sandbox_create_wait_read_median_s": med,
        "ratio": {name: m / bare_med for name, m in med.items()},
        "target_ratio": TARGET_RATIO,
        "bare_all_s": bare,
        "sandbox_all_s": sandbox,
        "concurrency": args.concurrency,
        "concurrent_sandboxes_wall_s": conc_sandbox,
        "concurrent_bare_wall_s": conc_bare,
        "left_running": len(left),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    rows = [("bare subprocess.run, median", f"{bare_med * 1000:.1f} ms")]
    for name, m in med.items():
        rows.append((f"sandbox create->wait->read ({name}), median", f"{m * 1000:.1f} ms"))
        rows.append((f"ratio ({name}; target <= 1.5)", f"{m / bare_med:.2f}"))
    rows.append((f"{args.concurrency} bare processes at once, wall", f"{conc_bare:.2f} s"))
    for name, wall in conc_sandbox.items():
        rows.append((f"{args.concurrency} sandboxes at once ({name}), wall", f"{wall:.2f} s"))
    rows.append(("sandboxes left running", str(len(left))))
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(
            title=f"local Modal server (modal {modal.__version__}, {os.cpu_count()} CPUs)"
        )
        table.add_column("measure")
        table.add_column("value", justify="right")
        for r in rows:
            table.add_row(*r)
        Console().print(table)
    except ImportError:
        for name, value in rows:
            print(f"{name:55} {value:>12}")
    print(f"wrote {args.out}")
    return 0 if med[default] / bare_med <= TARGET_RATIO and not left else 1


if __name__ == "__main__":
    sys.exit(main())
