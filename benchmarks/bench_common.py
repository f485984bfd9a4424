"""What the benchmark scripts share (run them as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Where each script writes its JSON unless told otherwise (``--out``); absolute, so
#: that a script run from another directory still writes here.
RESULTS = Path(__file__).resolve().parent / "results"


def isolate_modal_config() -> None:
    """A fresh HOME with no ~/.modal.toml and no MODAL_* variables: the local server only."""
    home = tempfile.mkdtemp(prefix="bench-home-")
    os.environ["HOME"] = home
    os.environ["MODAL_CONFIG_PATH"] = str(Path(home) / ".modal.toml")
    for key in list(os.environ):
        if key.startswith("MODAL_") and key != "MODAL_CONFIG_PATH":
            del os.environ[key]
