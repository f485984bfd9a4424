"""Create and exec latency of isolated sandboxes through the real modal client.

Measures (median of N, after a warm-up) on one isolated local server with its
fork server: create -> wait -> read stdout of ``python -c "print(1)"`` (forked
from a warm interpreter) and of ``echo 1`` (exec'd in its container), and
``exec`` of ``echo 1`` in a running sandbox -> wait -> read.

Written for issue 22's "nothing a sandbox writes is trusted": run it on two
checkouts (``PYTHONPATH=<checkout> python benchmarks/bench_create_exec.py``)
to compare, since the command and environment now reach the fork server's
child in a memfd and each sandbox loads a seccomp filter.

Usage: ``python benchmarks/bench_create_exec.py [--repeats 20] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench_common import RESULTS, isolate_modal_config


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "create_exec.json")
    args = parser.parse_args()
    isolate_modal_config()

    import modal

    from prefect_modal.local import LocalModal

    lm = LocalModal().start()
    try:
        app = modal.App.lookup("bench", create_if_missing=True, client=lm.client)
        for _ in range(3):  # warm up: imports, connections, the zygotes
            _create(modal, lm, app, ["python", "-c", "print(1)"])
        time.sleep(1.0)  # a warm zygote starts in the background on first use
        times: dict[str, list[float]] = {"create python -c": [], "create echo": [], "exec echo": []}
        runner = modal.Sandbox.create("sleep", "600", app=app, client=lm.client)
        _exec(runner)
        for _ in range(args.repeats):
            times["create python -c"].append(
                _create(modal, lm, app, ["python", "-c", "print(1)"])
            )
            times["create echo"].append(_create(modal, lm, app, ["echo", "1"]))
            times["exec echo"].append(_exec(runner))
        runner.terminate()
    finally:
        lm.stop()
    result = {k: round(statistics.median(v) * 1000, 1) for k, v in times.items()}
    print(json.dumps({"median_ms": result, "repeats": args.repeats}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"median_ms": result, "repeats": args.repeats}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
