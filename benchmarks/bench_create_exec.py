"""Create and exec latency of isolated sandboxes through the real modal client.

Measures (median of N, after a warm-up) on one isolated local server with its
fork server: create -> wait -> read stdout of ``python -c "print(1)"`` (forked
from a warm interpreter) and of ``echo 1`` (exec'd in its container), and
``exec`` of ``echo 1`` in a running sandbox -> wait -> read.

Written for issue 22's "nothing a sandbox writes is trusted" (the command and
environment reach the fork server's child in a memfd, each sandbox loads a
seccomp filter). ``--before DIR`` compares side by side in one run: two
``prefect-modal local serve`` processes, one importing ``prefect_modal`` from
DIR (e.g. ``git archive <commit> prefect_modal | tar -x -C DIR``), one from
this checkout, measured in turns so that the machine's load falls on both.

Usage: ``python benchmarks/bench_create_exec.py [--repeats 20] [--before DIR] [--out FILE]
[--smoke]`` (``--smoke``: one repeat, to check that it runs; its figures mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

from bench_common import RESULTS, isolate_modal_config, scratch_dir


def _create(modal: Any, lm: Any, app: Any, cmd: list[str]) -> float:
    t0 = time.perf_counter()
    sb = modal.Sandbox.create(*cmd, app=app, client=lm.client)
    sb.wait()
    out = sb.stdout.read()
    elapsed = time.perf_counter() - t0
    assert out == "1\n" and sb.returncode == 0, (out, sb.returncode)
    return elapsed


def _exec(sb: Any) -> float:
    t0 = time.perf_counter()
    p = sb.exec("echo", "1")
    p.wait()
    out = p.stdout.read()
    elapsed = time.perf_counter() - t0
    assert out == "1\n", out
    return elapsed


class _Served:
    """`prefect-modal local serve` in a process of its own, with a client for it."""

    def __init__(self, pythonpath: str | None, state: Path) -> None:
        from prefect_modal.local.embedded import make_client

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect_modal.local", "serve", "--state-dir", str(state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        exports: dict[str, str] = {}
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("export "):
                key, _, value = line[len("export ") :].strip().partition("=")
                exports[key] = shlex.split(value)[0] if value else value
            if line.startswith("READY "):
                break
        self.client = make_client(
            exports["MODAL_SERVER_URL"], exports["MODAL_TOKEN_ID"], exports["MODAL_TOKEN_SECRET"]
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class _Target:
    """One server under measurement: its client, app and a long-running sandbox."""

    def __init__(self, modal: Any, client: Any) -> None:
        self.lm = types.SimpleNamespace(client=client)
        self.app = modal.App.lookup("bench", create_if_missing=True, client=client)
        for _ in range(3):  # warm up: imports, connections, the zygotes
            _create(modal, self.lm, self.app, ["python", "-c", "print(1)"])
        self.runner = modal.Sandbox.create("sleep", "600", app=self.app, client=client)
        _exec(self.runner)
        self.times: dict[str, list[float]] = {
            "create python -c": [],
            "create echo": [],
            "exec echo": [],
        }

    def measure_once(self, modal: Any) -> None:
        self.times["create python -c"].append(
            _create(modal, self.lm, self.app, ["python", "-c", "print(1)"])
        )
        self.times["create echo"].append(_create(modal, self.lm, self.app, ["echo", "1"]))
        self.times["exec echo"].append(_exec(self.runner))

    def medians(self) -> dict[str, float]:
        return {k: round(statistics.median(v) * 1000, 1) for k, v in self.times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--before", help="a checkout's directory that holds prefect_modal/")
    parser.add_argument("--out", type=Path, default=RESULTS / "create_exec.json")
    parser.add_argument("--smoke", action="store_true", help="one repeat: check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    isolate_modal_config()

    import modal

    names = ["before", "after"] if args.before else ["this checkout"]
    paths = {"before": args.before, "after": None, "this checkout": None}
    served = {n: _Served(paths[n], scratch_dir("bench-create-exec-")) for n in names}
    try:
        targets = {n: _Target(modal, s.client) for n, s in served.items()}
        time.sleep(1.0)  # a warm zygote starts in the background on first use
        for _ in range(args.repeats):
            for target in targets.values():  # in turns: the load falls on both
                target.measure_once(modal)
        for target in targets.values():
            target.runner.terminate()
    finally:
        for s in served.values():
            s.stop()
    result = {
        "median_ms": {n: t.medians() for n, t in targets.items()},
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "smoke": args.smoke,
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
