"""A program's own stderr: a sandbox's, without the local server's leading notice.

Why: where this machine cannot give a guarantee, the local server says so in
each sandbox's log before the program's first byte (`Sandbox._start_now`). A
normal user's sandboxes, whose limits this machine's cgroup v1 hierarchies do
not let them have, start with the line `cgroups.LIMITS_NOTICE` begins. Tests
that compare a program's stderr byte for byte compare what follows it; the
notice itself is tested where it is made (tests/local/test_limits.py).

Imported as ``from notices import program_stderr`` (the rootdir conftest puts
`tests/` on sys.path).
"""

from __future__ import annotations

from typing import TypeVar

from prefect_modal.local.runtime.cgroups import LIMITS_NOTICE

Text = TypeVar("Text", str, bytes)


def program_stderr(text: Text) -> Text:
    """``text`` without its first line when that line is the limits notice."""
    if isinstance(text, bytes):
        head, _, rest = text.partition(b"\n")
        return rest if head.startswith(LIMITS_NOTICE.encode()) else text
    head, _, rest = text.partition("\n")
    return rest if head.startswith(LIMITS_NOTICE) else text
