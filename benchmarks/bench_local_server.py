"""Benchmark the local Modal server against running the same command bare.

Measures, through the real modal client:

* create -> wait -> read stdout of three commands (median of N runs each)
  against ``subprocess.run`` of the same program: ``python -c "print(1)"``
  (forked from a warm interpreter; target ratio <= 1.0), ``python -I -c``
  (exec'd in its container; <= 1.5) and ``echo 1`` (<= 1.5);
* wall time of 50 sandboxes run at once, against 50 bare processes at once;

each for the server's default (isolated containers, ``python -c`` forked from a
warm interpreter, `prefect_modal.local.runtime.forkserver`), with the fork
server off (every sandbox exec'd in its container), and without isolation,
side by side in one run;

* the memory of a long-running ``prefect-modal local serve`` (its own process)
  over 5,000 sandboxes that each print 100 kB (create -> wait -> read stdout):
  the server's RSS after warming up and at the end, with pruning of finished
  sandboxes (a short retention, so it happens during the run) and without
  (``--retention 0``, every sandbox kept); the target growth is <= 50 MB.

Usage: ``python benchmarks/bench_local_server.py [--repeats 20] [--concurrency 50]
[--memory-sandboxes 5000] [--out benchmarks/results/local_server.json] [--smoke]``

``--smoke`` runs every measure at a tiny size (one repeat, 2 at once, 4
sandboxes for the memory after 2 warm-up ones) to check that the benchmark
works: its figures mean nothing, so it exits non-zero only if a sandbox was
left running, never for a missed target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import RESULTS, isolate_modal_config

CMD = ["python", "-c", "print(1)"]
#: what is timed, each against a bare ``subprocess.run`` of the same program, with the
#: target ratio of issue 10: a forked ``python -c`` at most as slow as the bare process,
#: any other command at most 1.5x
COMMANDS: dict[str, tuple[list[str], float]] = {
    "python -c": (CMD, 1.0),
    "python -I -c (exec'd)": (["python", "-I", "-c", "print(1)"], 1.5),
    "echo": (["echo", "1"], 1.5),
}
TARGET_RATIO = COMMANDS["python -c"][1]
# 1,000 lines of 100 bytes: 100 kB of stdout per sandbox
PRINT_100KB = ["python", "-c", "import sys; sys.stdout.write(('x' * 99 + '\\n') * 1000)"]
PRINT_BYTES = 100_000
TARGET_RSS_GROWTH_MB = 50.0
MEMORY_RETENTION_S = 2.0  # short, so pruning happens during the run


def _bare_argv(cmd: list[str]) -> list[str]:
    if cmd[0] == "python":
        return [sys.executable, *cmd[1:]]
    return [shutil.which(cmd[0]) or cmd[0], *cmd[1:]]


def bench_bare(repeats: int, cmd: list[str] = CMD) -> list[float]:
    argv = _bare_argv(cmd)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        times.append(time.perf_counter() - t0)
        assert out == "1\n"
    return times


def bench_sandbox(lm: Any, app: Any, repeats: int, cmd: list[str] = CMD) -> list[float]:
    import modal

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sb = modal.Sandbox.create(*cmd, app=app, client=lm.client)
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


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def bench_memory(n: int, retention_s: float, parallel: int = 8, warm: int = 200) -> dict[str, Any]:
    """Server RSS over ``n`` sandboxes that each print 100 kB, in a server process of its own,
    measured after ``warm`` sandboxes (imports, connections, the zygote, allocator pools)."""
    import modal

    from prefect_modal.cli.services import start_local_modal
    from prefect_modal.local import make_client

    state = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    service = start_local_modal(state, extra_args=["--retention", str(retention_s)])
    client = make_client(
        service.env["MODAL_SERVER_URL"],
        service.env["MODAL_TOKEN_ID"],
        service.env["MODAL_TOKEN_SECRET"],
    )
    samples: list[tuple[int, int]] = []
    try:
        app = modal.App.lookup("bench-memory", create_if_missing=True, client=client)

        async def run(count: int) -> None:
            gate = asyncio.Semaphore(parallel)

            async def one() -> None:
                async with gate:
                    sb = await modal.Sandbox.create.aio(*PRINT_100KB, app=app, client=client)
                    await sb.wait.aio()
                    out = await sb.stdout.read.aio()
                    assert len(out) == PRINT_BYTES and sb.returncode == 0, (len(out), sb.returncode)

            tasks = [asyncio.ensure_future(one()) for _ in range(count)]
            for i, task in enumerate(asyncio.as_completed(tasks), 1):
                await task
                if i % 250 == 0:
                    samples.append((i, rss_kib(service.pid)["VmRSS"]))

        asyncio.run(run(warm))
        time.sleep(retention_s + 1.0 if retention_s else 1.0)
        before = rss_kib(service.pid)["VmRSS"]
        samples.clear()
        t0 = time.perf_counter()
        asyncio.run(run(n))
        wall = time.perf_counter() - t0
        time.sleep(retention_s + 1.0 if retention_s else 1.0)  # let the last ones be pruned
        after = rss_kib(service.pid)
        kept = len(json.loads((state / "sandboxes.json").read_text())["sandboxes"])
        roots = len(list((state / "sandboxes").iterdir()))
    finally:
        client.close()
        service.stop()
        shutil.rmtree(state, ignore_errors=True)
    growth_mb = (after["VmRSS"] - before) / 1024
    return {
        "sandboxes": n,
        "warm_up_sandboxes": warm,
        "stdout_bytes_each": PRINT_BYTES,
        "retention_s": retention_s or None,
        "parallel": parallel,
        "wall_s": wall,
        "rss_before_mb": before / 1024,
        "rss_after_mb": after["VmRSS"] / 1024,
        "rss_peak_mb": after["VmHWM"] / 1024,
        "rss_growth_mb": growth_mb,
        "rss_growth_per_sandbox_kb": (after["VmRSS"] - before) / n,
        "rss_samples_mb": [(i, kib / 1024) for i, kib in samples],
        "listed_at_end": kept,
        "sandbox_roots_on_disk_at_end": roots,
        "target_growth_mb": TARGET_RSS_GROWTH_MB,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--memory-sandboxes", type=int, default=5000, help="0 skips the memory measure"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "local_server.json")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, one repeat: does it work? (no verdict)"
    )
    args = parser.parse_args()
    warm_memory = 200
    if args.smoke:
        args.repeats, args.concurrency, warm_memory = 1, 2, 2
        args.memory_sandboxes = min(args.memory_sandboxes, 4)
    isolate_modal_config()

    import modal

    from prefect_modal.local import LocalModal

    # the default (isolated containers, python -c forked warm), the fork server off, and
    # the server without isolation, side by side in one run
    modes = {
        "isolated, fork server": {"fork_server": True},
        "isolated, exec": {"fork_server": False},
        "not isolated, fork server": {"fork_server": True, "isolation": False},
    }
    servers = {name: LocalModal(**kw).start() for name, kw in modes.items()}
    try:
        apps = {
            name: modal.App.lookup("bench", create_if_missing=True, client=lm.client)
            for name, lm in servers.items()
        }
        for name, lm in servers.items():
            bench_sandbox(lm, apps[name], 3)  # warm up: imports, connections, the zygote
        time.sleep(1.0)  # the zygote starts in the background on first use
        bare: dict[str, list[float]] = {c: [] for c in COMMANDS}
        sandbox: dict[str, dict[str, list[float]]] = {
            c: {name: [] for name in servers} for c in COMMANDS
        }
        for c, (cmd, _target) in COMMANDS.items():
            bench_bare(3, cmd)
            for _ in range(args.repeats):  # interleave, so drift hits all alike
                bare[c] += bench_bare(1, cmd)
                for name, lm in servers.items():
                    sandbox[c][name] += bench_sandbox(lm, apps[name], 1, cmd)
        conc_bare = bench_concurrent_bare(args.concurrency)
        conc_sandbox = {
            name: bench_concurrent_sandboxes(lm, apps[name], args.concurrency)
            for name, lm in servers.items()
        }
        left = [r for lm in servers.values() for r in lm.sandboxes() if r.status == "running"]
    finally:
        for lm in servers.values():
            lm.stop()

    memory: dict[str, dict[str, Any]] = {}
    if args.memory_sandboxes:
        memory["pruning"] = bench_memory(
            args.memory_sandboxes, MEMORY_RETENTION_S, warm=warm_memory
        )
        memory["no pruning"] = bench_memory(args.memory_sandboxes, 0, warm=warm_memory)

    default = "isolated, fork server"
    bare_med = {c: statistics.median(times) for c, times in bare.items()}
    med = {
        c: {name: statistics.median(times) for name, times in per.items()}
        for c, per in sandbox.items()
    }
    ratio = {c: {name: m / bare_med[c] for name, m in per.items()} for c, per in med.items()}
    result = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "modal_version": modal.__version__,
        "argv": sys.argv[1:],
        "smoke": args.smoke,
        "load_average_at_end": os.getloadavg(),
        "repeats": args.repeats,
        "commands": {c: cmd for c, (cmd, _t) in COMMANDS.items()},
        "bare_subprocess_run_median_s": bare_med,
        "sandbox_create_wait_read_median_s": med,
        "ratio": ratio,
        "target_ratio": {c: t for c, (_cmd, t) in COMMANDS.items()},
        "bare_all_s": bare,
        "sandbox_all_s": sandbox,
        "concurrency": args.concurrency,
        "concurrent_sandboxes_wall_s": conc_sandbox,
        "concurrent_bare_wall_s": conc_bare,
        "left_running": len(left),
        "server_memory": memory,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    rows = []
    for c, (_cmd, target) in COMMANDS.items():
        rows.append((f"{c}: bare subprocess.run, median", f"{bare_med[c] * 1000:.1f} ms"))
        for name, m in med[c].items():
            rows.append(
                (
                    f"{c}: sandbox create->wait->read ({name}), median (ratio; target <= {target})",
                    f"{m * 1000:.1f} ms ({ratio[c][name]:.2f})",
                )
            )
    rows.append((f"{args.concurrency} bare processes at once, wall", f"{conc_bare:.2f} s"))
    for name, wall in conc_sandbox.items():
        rows.append((f"{args.concurrency} sandboxes at once ({name}), wall", f"{wall:.2f} s"))
    rows.append(("sandboxes left running", str(len(left))))
    for mem in memory.values():
        label = f"retention {mem['retention_s']:g} s" if mem["retention_s"] else "kept forever"
        rows.append(
            (
                f"server RSS over {mem['sandboxes']} sandboxes x 100 kB ({label}): "
                "before -> after (growth; target <= 50 MB)",
                f"{mem['rss_before_mb']:.0f} -> {mem['rss_after_mb']:.0f} MB "
                f"({mem['rss_growth_mb']:+.1f} MB)",
            )
        )
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
    memory_ok = "pruning" not in memory or (
        memory["pruning"]["rss_growth_mb"] <= TARGET_RSS_GROWTH_MB
    )
    speed_ok = all(ratio[c][default] <= t for c, (_cmd, t) in COMMANDS.items())
    if args.smoke:  # tiny samples: a target met or missed says nothing
        return 0 if not left else 1
    return 0 if speed_ok and not left and memory_ok else 1


if __name__ == "__main__":
    sys.exit(main())
