"""Published task-runner test suites, run against `ModalTaskRunner`.

The suites are taken from their published sources at test time, never copied
into this repository: prefect-dask's `tests/test_task_runners.py` from its
sdist on PyPI, and Prefect's own `tests/test_task_runners.py` (class
`TestThreadPoolTaskRunner`) from a checkout of github.com/PrefectHQ/prefect
named by `PREFECT_SOURCE_DIR` (Prefect's sdist on PyPI ships no tests).  Each
runs in a pytest subprocess next to `harness_conftest.py`, which substitutes
`ModalTaskRunner` (on a local Modal server) for the runner the suite tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from safe_tar import safe_extract

HERE = Path(__file__).parent
PREFECT_DASK_VERSION = "0.3.7"

#: prefect-dask tests of Dask itself (clusters, dataframes, Dask's task keys and
#: performance reports): nothing of a task runner's contract to check.
DASK_ONLY = (
    "dask_task_key",
    "adapt",
    "string_cluster",
    "dataframe",
    "performance_report",
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _run_suite(test_file: Path, workdir: Path, select: str) -> dict[str, int]:
    """Run one suite with the harness; its counts from the JUnit report."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(test_file, workdir / f"test_{test_file.stem.removeprefix('test_')}_suite.py")
    shutil.copy(HERE / "harness_conftest.py", workdir / "conftest.py")
    report = workdir / "report.xml"
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)  # the harness starts its own API
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(workdir),
            "--timeout",
            "900",
            f"--junitxml={report}",
            "-k",
            select,
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert report.exists(), f"the suite did not run:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    print(f"{test_file}: {counts}")
    assert counts["failures"] == counts["errors"] == 0, proc.stdout[-8000:]
    return counts


def test_prefect_dask_suite_passes_with_modal_task_runner(tmp_path: Path) -> None:
    download = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"prefect-dask=={PREFECT_DASK_VERSION}",
            "-d",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    sdists = list(tmp_path.glob("prefect_dask-*.tar.gz"))
    if download.returncode != 0 or not sdists:
        pytest.skip(reason=f"PyPI unreachable for prefect-dask's sdist: {download.stderr[-500:]}")
    with tarfile.open(sdists[0]) as archive:
        member = archive.getmember(
            f"prefect_dask-{PREFECT_DASK_VERSION}/tests/test_task_runners.py"
        )
        safe_extract(archive, tmp_path / "src", [member])  # Python 3.11.0+, not only 3.11.4+
    source = tmp_path / "src" / member.name
    # one runner variant (the suite's four are all the substituted runner), no Dask-only tests
    select = "(default_dask_task_runner or not task_runner) and not " + " and not ".join(DASK_ONLY)
    counts = _run_suite(source, tmp_path / "run", select)
    assert counts["passed"] >= 14 and counts["skipped"] == 0


@pytest.mark.skipif(
    not os.environ.get("PREFECT_SOURCE_DIR"),
    reason=(
        "Prefect's PyPI sdist ships no tests: set PREFECT_SOURCE_DIR to a checkout of "
        "github.com/PrefectHQ/prefect to run its tests/test_task_runners.py"
    ),
)
def test_prefect_thread_pool_suite_passes_with_modal_task_runner(tmp_path: Path) -> None:
    source = Path(os.environ["PREFECT_SOURCE_DIR"]) / "tests" / "test_task_runners.py"
    assert source.exists(), f"{source} not found: PREFECT_SOURCE_DIR must be a Prefect checkout"
    counts = _run_suite(source, tmp_path / "run", "TestThreadPoolTaskRunner")
    assert counts["passed"] >= 16 and counts["skipped"] == 0
