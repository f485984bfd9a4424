"""Every script in `benchmarks/` runs: its `--smoke` mode exits 0 and writes its JSON.

Why: benchmarks are run by hand, rarely, so one that stops working goes
unnoticed (issue 25: `bench_worker.py` failed for weeks once sandboxes were
isolated). Each script runs here as a user runs it, `python
benchmarks/<script>.py`, in a subprocess, at its smoke sizes (tiny maps, one
repeat, no waits for a quiet machine). What is checked is that it ran: exit
0, its JSON parses and has the shape its docs table is made from, nothing was
written to `benchmarks/results/`, and every process it started (servers,
workers, sandboxes) is gone once it exits. Never a time: on a shared 2-core
machine a smoke run's figures mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from process_tree import Proc, alive, descendants, describe

from prefect_modal.cli import services

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
#: The longest a smoke run may take before it counts as hung (seconds; most take < 60).
RUN_LIMIT = 420

pytestmark = [pytest.mark.slow, pytest.mark.timeout(RUN_LIMIT + 120)]


def _can_isolate() -> bool:
    """Whether the local server can isolate sandboxes here: Linux namespaces, which a
    normal user makes inside a user namespace of its own (`unshare -U -r` tries one)."""
    if not os.path.exists("/proc/self/ns/pid"):
        return False
    if os.geteuid() == 0:
        return True
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = [unshare, "--user", "--map-root-user", "--mount", "--pid", "--fork", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


NEEDS_ISOLATION = pytest.mark.skipif(
    not _can_isolate(),
    reason="needs isolated sandboxes: Linux namespaces (a normal user's in a user namespace)",
)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _check_local_server(data: dict[str, Any]) -> None:
    commands = set(data["commands"])
    assert commands == {"python -c", "python -I -c (exec'd)", "echo"}
    assert set(data["bare_subprocess_run_median_s"]) == commands
    modes = {"isolated, fork server", "isolated, exec", "not isolated, fork server"}
    for measure in ("sandbox_create_wait_read_median_s", "ratio"):
        assert set(data[measure]) == commands, measure
        for per_mode in data[measure].values():
            assert set(per_mode) == modes and all(map(_number, per_mode.values()))
    assert set(data["concurrent_sandboxes_wall_s"]) == modes
    assert set(data["server_memory"]) == {"pruning", "no pruning"}
    for memory in data["server_memory"].values():
        assert all(_number(memory[k]) for k in ("rss_before_mb", "rss_after_mb", "rss_growth_mb"))
    assert data["left_running"] == 0


def _check_local_files(data: dict[str, Any]) -> None:
    assert set(data["create_wait_ms"]) == {
        "base image",
        "snapshot of the files",
        "add_local_dir (mount)",
        "add_local_dir (copy=True)",
    }
    assert set(data["volume_mib_s"]) == {"batch_upload", "read_file", "shutil.copyfile"}
    assert _number(data["snapshot_filesystem_ms"])
    assert all(map(_number, [*data["create_wait_ms"].values(), *data["volume_mib_s"].values()]))


def _check_images(data: dict[str, Any]) -> None:
    assert len(data["create_wait_ms"]) == 4 and "no image (base)" in data["create_wait_ms"]
    assert len(data["first_build_s"]) == 2
    assert all(map(_number, [*data["create_wait_ms"].values(), *data["first_build_s"].values()]))


def _check_task_runner(data: dict[str, Any]) -> None:
    runners = {row["runner"] for row in data["rows"]}
    assert runners == {
        "ThreadPoolTaskRunner",
        "ProcessPoolTaskRunner",
        *(
            f"Modal {mode} ({where})"
            for mode in ("warm", "cold")
            for where in ("embedded", "process")
        ),
        "Modal warm (embedded, modal latency)",
        "Modal cold (embedded, modal latency)",
    }
    for row in data["rows"]:
        assert row["tasks"] == 2 and len(row["runs"]) == 1, row
        assert all(_number(row[k]) for k in ("wall_s", "settled_s", "ratio_vs_thread")), row
    assert data["big_map"]["tasks"] == 4 and data["big_map"]["sandboxes_left_running"] == 0
    assert len(data["warm_vs_cold"]) == 3  # embedded, process, embedded with latency


def _check_worker(data: dict[str, Any]) -> None:
    assert data["runs_per_worker"] == 1
    for key in ("seconds", "median_seconds"):
        assert set(data[key]) == {"modal", "process"}, key
    assert all(len(times) == 1 and _number(times[0]) for times in data["seconds"].values())
    assert _number(data["ratio_modal_over_process"])


def _check_isolation(data: dict[str, Any]) -> None:
    measures = {"run true", "run python3 -S -c pass", "exec true"}
    loads = {"none", "cpu", "sandboxes"}  # every load by default
    assert set(data["loads"]) == set(data["median_s"]) == set(data["ratio_over_before"]) == loads
    for load in loads:
        assert set(data["median_s"][load]) == measures
        for per_server in data["median_s"][load].values():
            assert len(per_server) == 4 and all(map(_number, per_server.values()))
        ratios = data["ratio_over_before"][load]
        assert len(ratios) == 3  # after and its two variants
        assert all(set(r) == measures and all(map(_number, r.values())) for r in ratios.values())
    assert _number(data["worst_ratio_after_over_before"])


#: script -> (arguments besides --smoke and --out, the check of its JSON)
SCRIPTS: dict[str, tuple[list[str], Callable[[dict[str, Any]], None]]] = {
    "bench_local_server.py": ([], _check_local_server),
    "bench_local_files.py": ([], _check_local_files),
    "bench_images.py": ([], _check_images),
    # both servers: the smoke run reaches every runner the script can measure
    "bench_task_runner.py": (["--server", "both"], _check_task_runner),
    "bench_worker.py": ([], _check_worker),
    "bench_isolation.py": ([], _check_isolation),
}


def test_every_benchmark_script_has_a_smoke_test() -> None:
    assert {p.name for p in BENCHMARKS.glob("bench_*.py")} - {"bench_common.py"} == set(SCRIPTS)


def _run_watched(
    cmd: list[str], env: dict[str, str], cwd: Path, log: Path
) -> tuple[int, set[Proc]]:
    """Run `cmd` to its end, collecting every process it starts (by pid and start time)."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stopped as a whole if it hangs
        )
    seen: set[Proc] = set()
    deadline = time.monotonic() + RUN_LIMIT
    try:
        while proc.poll() is None:
            seen |= descendants(proc.pid)
            if time.monotonic() > deadline:
                pytest.fail(f"{cmd[1]} did not end within {RUN_LIMIT}s:\n{_tail(log)}")
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, seen


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]


def _results_listing() -> set[str]:
    return {p.name for p in RESULTS.iterdir()} if RESULTS.is_dir() else set()


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(name, marks=NEEDS_ISOLATION)
        if name in ("bench_images.py", "bench_worker.py")
        else name
        for name in SCRIPTS
    ],
)
def test_smoke_run_writes_its_json_and_leaves_nothing(script: str, tmp_path: Path) -> None:
    extra, check = SCRIPTS[script]
    out = tmp_path / "out" / f"{Path(script).stem}.json"
    log = tmp_path / f"{Path(script).stem}.log"
    before = _results_listing()
    # From another directory, with no PREFECT_* / MODAL_* setting of ours: as a user's shell.
    code, started = _run_watched(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--out", str(out), *extra],
        services.isolated_env(tmp_path / "home"),
        tmp_path,
        log,
    )
    assert code == 0, f"{script} --smoke exited {code}:\n{_tail(log)}"
    data = json.loads(out.read_text())
    assert data["smoke"] is True
    check(data)
    assert _results_listing() == before, "a smoke run wrote to benchmarks/results/"
    deadline = time.monotonic() + 15
    left = {p for p in started if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = {p for p in left if alive(p)}
    assert not left, f"{script} left processes running:\n" + "\n".join(describe(left))
