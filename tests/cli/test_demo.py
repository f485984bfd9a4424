"""The main job's own failure paths (its success path is `.ci/run`'s second step)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefect_modal.cli.demo import RunSummary


def test_demo_without_example_flows_says_where_to_run_it(tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "prefect-modal"
    result = subprocess.run(
        [str(cli), "demo", "--flows-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"No example flows in {tmp_path}" in result.stdout.replace("\n", "")
    assert "--flows-dir" in result.stdout


def test_a_run_counts_as_ok_only_when_completed() -> None:
    assert RunSummary(flow="f", mode="per_step", flow_run_id=None, state="Completed", seconds=1).ok
    for state in ("Failed", "Crashed", "Cancelled", "Unknown"):
        assert not RunSummary(
            flow="f", mode="pipeline", flow_run_id=None, state=state, seconds=1
        ).ok
