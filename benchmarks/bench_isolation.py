"""Sandbox create and exec latency, before and after a change to the local server's isolation.

Why: issue 22 made every local sandbox a user namespace with a seccomp filter,
cgroup limits and a network of its own, and asked that create and exec stay
within 1.5x of what they cost before. Figures from two separate runs on a
shared 2-core machine differ by more than that bound, so both servers run
side by side in one run: ``--before REV`` is extracted with ``git archive``
(nothing in the repository changes) and served by ``python -m
prefect_modal.local serve`` with that tree first on ``PYTHONPATH``; the
working tree's server is the *after*. Each repeat measures every server in
turn, through the real modal client, so load swings hit both alike.

Measured (median of ``--repeats``): ``Sandbox.create("true")`` to ``wait()``;
the same with ``python3 -S -c pass``; ``sb.exec("true")`` to ``wait()`` in a
running sandbox. Besides before and after, *after* with one feature off at a
time where a switch exists (`VARIANTS`): where the time goes.

Each measure is taken under every load of ``--loads`` (`LOADS`), one after the
other in the same run: none added (whatever else the machine runs), every
core busy, and another local server starting and ending sandboxes
meanwhile. The last is what a flow with
parallel tasks does to its own machine; it loads the kernel paths that
isolation adds (namespaces made and torn down, cgroup moves, which wait for
RCU grace periods), not only the CPU, so a cost that only shows under load
shows there.

Usage: ``python benchmarks/bench_isolation.py [--before 1a6acf6] [--repeats 20]
[--loads none,cpu,sandboxes] [--out benchmarks/results/isolation.json] [--smoke]``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench_common import RESULTS, isolate_modal_config, scratch_dir

ROOT = Path(__file__).resolve().parents[1]
#: the last commit before issue 22's isolation work
BASELINE = "1a6acf6"
TARGET_RATIO = 1.5


def _tree_of(rev: str) -> Path:
    """``prefect_modal/`` as it was at ``rev``, in a scratch directory (``git archive``)."""
    try:
        # safe.directory: a user who is not the checkout's owner reads it too (git refuses
        # others' repositories by default; `archive` runs none of the checkout's hooks)
        git = ["git", "-c", f"safe.directory={ROOT}", "-C", str(ROOT)]
        data = subprocess.run(
            [*git, "archive", "--format=tar", rev, "prefect_modal"],
            capture_output=True,
            check=True,
        ).stdout
    except subprocess.CalledProcessError as exc:
        sys.exit(
            f"cannot read revision {rev!r} of {ROOT}: {exc.stderr.decode().strip()}\n"
            "(a shallow clone lacks it: fetch the history, or pass --before HEAD)"
        )
    tree = scratch_dir("bench-isolation-before-")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tree, filter="data")
    return tree


#: "after" with one feature off at a time (where a switch exists): where the time goes
VARIANTS: dict[str, dict[str, str]] = {
    "after, no seccomp filter": {"PREFECT_MODAL_LOCAL_SECCOMP": "0"},
    "after, no cgroups": {"PREFECT_MODAL_LOCAL_CGROUP_ROOT": "/nonexistent-cgroup-root"},
}


@contextmanager
def served(tree: Path | None, state: Path, extra: dict[str, str] | None = None) -> Iterator[Any]:
    """A `local serve` process of ``tree`` (None: this checkout), and a client of it."""
    from prefect_modal.local import make_client

    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect_modal.local", "serve", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        exports: dict[str, str] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("export "):
                key, _, value = line[len("export ") :].strip().partition("=")
                exports[key] = value
            if line.startswith("READY "):
                break
        else:
            raise RuntimeError(f"the server of {tree or ROOT} ended before READY")
        client = make_client(
            exports["MODAL_SERVER_URL"], exports["MODAL_TOKEN_ID"], exports["MODAL_TOKEN_SECRET"]
        )
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _run(client: Any, app: Any, *argv: str) -> Callable[[], None]:
    import modal

    def run() -> None:
        sb = modal.Sandbox.create(*argv, app=app, client=client)
        code = sb.wait(raise_on_termination=False)
        assert sb.returncode == 0, (argv, code, sb.stderr.read())

    return run


def _exec(sb: Any) -> Callable[[], None]:
    def run() -> None:
        proc = sb.exec("true")
        assert proc.wait() == 0

    return run


MEASURES = ("run true", "run python3 -S -c pass", "exec true")

#: what else the machine does while a measure is taken (`loaded`)
LOADS = {
    "none": "the benchmark adds no load (the machine may run other things)",
    "cpu": "one busy loop per core",
    "sandboxes": "another local server (this checkout's) starts and ends sandboxes in a loop",
}


def _churn() -> None:
    """The ``sandboxes`` load: this checkout's server, one ``true`` sandbox after another,
    until SIGTERM (which ends the server too: `served`'s clean-up runs)."""
    import modal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    isolate_modal_config()
    with served(None, scratch_dir("bench-isolation-churn-")) as client:
        app = modal.App.lookup("bench-isolation-churn", create_if_missing=True, client=client)
        print("churning", flush=True)
        while True:
            modal.Sandbox.create("true", app=app, client=client).wait(raise_on_termination=False)


@contextmanager
def loaded(load: str) -> Iterator[None]:
    """``load`` (a key of `LOADS`) runs while the block does; its processes are stopped
    by pid when it ends."""
    if load == "none":
        yield
        return
    if load == "cpu":
        code = "while True: pass"
        argvs = [[sys.executable, "-c", code] for _ in range(os.cpu_count() or 1)]
    elif load == "sandboxes":
        argvs = [[sys.executable, __file__, "--churn"]]
    else:
        raise SystemExit(f"--loads: unknown load {load!r} (accepted: {', '.join(LOADS)})")
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for argv in argvs
    ]
    try:
        if load == "sandboxes":
            assert procs[0].stdout is not None
            if procs[0].stdout.readline().strip() != "churning":
                raise RuntimeError("the sandboxes load's server did not start")
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _measure(
    targets: dict[str, dict[str, Callable[[], None]]], repeats: int, load: str
) -> dict[str, dict[str, list[float]]]:
    """Every measure of every server, ``repeats`` times, each repeat starting with another
    server: a sandbox's end leaves the kernel work (namespace teardown) that slows the
    next one, so none always comes second."""
    names = list(targets)
    times: dict[str, dict[str, list[float]]] = {m: {n: [] for n in names} for m in MEASURES}
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for measure in MEASURES:
            for name in order:
                times[measure][name].append(_timed(targets[name][measure]))
        print(f"\r{load}: {i + 1}/{repeats} repeats", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BASELINE, help="the revision measured as 'before'")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--loads",
        default=",".join(LOADS),
        help=f"what else runs meanwhile, in turn (comma-separated: {', '.join(LOADS)})",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "isolation.json")
    parser.add_argument("--smoke", action="store_true", help="2 repeats: shows that it runs")
    parser.add_argument("--churn", action="store_true", help=argparse.SUPPRESS)  # `loaded`
    args = parser.parse_args()
    if args.churn:
        _churn()
        return 0
    loads = [name.strip() for name in args.loads.split(",") if name.strip()]
    unknown = [name for name in loads if name not in LOADS]
    if unknown or not loads:
        parser.error(f"--loads {args.loads!r}: accepted are {', '.join(LOADS)}")
    repeats = 2 if args.smoke else args.repeats
    isolate_modal_config()
    import modal

    before_tree = _tree_of(args.before)
    trees: dict[str, Path | None] = {f"before ({args.before})": before_tree, "after": None}
    trees.update(dict.fromkeys(VARIANTS))
    per_load: dict[str, dict[str, dict[str, list[float]]]] = {}
    with ExitStack() as stack:
        targets = {}
        for name, tree in trees.items():
            state = scratch_dir("bench-isolation-state-")
            client = stack.enter_context(served(tree, state, VARIANTS.get(name)))
            app = modal.App.lookup("bench-isolation", create_if_missing=True, client=client)
            sleeper = modal.Sandbox.create("sleep", "infinity", app=app, client=client)
            stack.callback(sleeper.terminate)
            targets[name] = {
                "run true": _run(client, app, "true"),
                "run python3 -S -c pass": _run(client, app, "python3", "-S", "-c", "pass"),
                "exec true": _exec(sleeper),
            }
        for fn in (f for per in targets.values() for f in per.values()):
            fn()  # warm-up: first imports, first fork-server start
        for load in loads:
            with loaded(load):
                per_load[load] = _measure(targets, repeats, load)

    before, after, *variants = trees
    medians = {
        load: {m: {n: statistics.median(t) for n, t in per.items()} for m, per in times.items()}
        for load, times in per_load.items()
    }
    data = {
        "smoke": args.smoke,
        "before": args.before,
        "repeats": repeats,
        "loads": {load: LOADS[load] for load in loads},
        "median_s": medians,
        "ratio_over_before": {
            load: {n: {m: per[m][n] / per[m][before] for m in MEASURES} for n in (after, *variants)}
            for load, per in medians.items()
        },
        "worst_ratio_after_over_before": max(
            per[m][after] / per[m][before] for per in medians.values() for m in MEASURES
        ),
        "target_ratio": TARGET_RATIO,
        "load_average_at_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"local sandbox latency, median of {repeats} (modal {modal.__version__})")
    for column in ("load", "measure", *trees):
        table.add_column(column)
    for load, per in medians.items():
        for m in MEASURES:
            table.add_row(
                load,
                m,
                f"{per[m][before] * 1e3:.1f} ms",
                *(
                    f"{per[m][n] * 1e3:.1f} ms ({per[m][n] / per[m][before]:.2f}x)"
                    for n in (after, *variants)
                ),
            )
    Console().print(table)
    worst = data["worst_ratio_after_over_before"]
    print(f"worst after/before: {worst:.2f}x (target {TARGET_RATIO}x)")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
