"""A first run works: `python flows/hello.py` on a machine that never ran Prefect.

Prefect then starts a temporary server that creates and migrates a new
database; on a slow or busy machine that takes longer than its 20 s startup
timeout, and the first run failed with "Timed out while attempting to connect
to ephemeral Prefect API server".  The examples raise that timeout for
themselves (never for other code) unless the user set it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefect_modal.cli.services import isolated_env

ROOT = Path(__file__).resolve().parents[2]
SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EXAMPLES = ["flows/hello.py", "flows/ml_pipeline.py", "flows/pipeline.py"]


@pytest.mark.slow
def test_hello_completes_on_its_first_run_in_a_fresh_home(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    env = isolated_env(tmp_path / "home")  # no Prefect database, profile or Modal token yet
    env.pop("PREFECT_HOME")  # Prefect's own default: ~/.prefect under the fresh HOME
    assert not (tmp_path / "home" / ".prefect").exists()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "flows/hello.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    elapsed = time.monotonic() - started
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "HELLO ADA! | HELLO GRACE! | HELLO LINUS!" in result.stdout, out[-3000:]
    assert (tmp_path / "home" / ".prefect" / "prefect.db").exists()  # it was a first run
    print(f"first run of flows/hello.py in a fresh HOME: {elapsed:.1f} s")


def _effective_timeout(example: str, extra_env: dict[str, str], run_name: str) -> float:
    """Prefect's startup timeout after the example's preamble, as Prefect reads it."""
    code = (
        "import sys; src = open(sys.argv[1]).read();"
        "exec(src.split('\\nfrom prefect ')[0].split('\\nimport random')[0]"
        ".split('\\nimport platform')[0], {'__name__': sys.argv[2]});"
        "from prefect.settings import get_current_settings;"
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)"
    )
    env = isolated_env(Path("/nonexistent-home")) | extra_env
    out = subprocess.run(
        [sys.executable, "-c", code, example, run_name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("example", EXAMPLES)
def test_examples_raise_the_startup_timeout_only_for_themselves(example: str) -> None:
    assert _effective_timeout(example, {}, "__main__") == 120
    # a user's own value wins; imported (by the demo, a deployment) nothing changes
    assert _effective_timeout(example, {SETTING: "45"}, "__main__") == 45
    assert _effective_timeout(example, {}, "flows") == 20
    assert _effective_timeout(example, {"PREFECT_API_URL": "http://x/api"}, "__main__") == 20
