"""What the benchmark scripts share (run them as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

#: Where each script writes its JSON unless told otherwise (``--out``); absolute, so
#: that a script run from another directory still writes here.
RESULTS = Path(__file__).resolve().parent / "results"


def scratch_dir(prefix: str) -> Path:
    """A new temporary directory, removed when this process exits: runs (and the
    test suite's smoke runs) leave nothing behind in the temporary directory."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def isolate_modal_config() -> None:
    """A fresh HOME with no ~/.modal.toml and no MODAL_* variables: the local server only."""
    home = scratch_dir("bench-home-")
    os.environ["HOME"] = str(home)
    os.environ["MODAL_CONFIG_PATH"] = str(home / ".modal.toml")
    for key in list(os.environ):
        if key.startswith("MODAL_") and key != "MODAL_CONFIG_PATH":
            del os.environ[key]
