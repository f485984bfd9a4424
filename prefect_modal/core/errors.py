"""The root of prefect-modal's errors.

Every error the adapter raises derives from `PrefectModalError`, so a caller
can catch all of them at once (``except PrefectModalError``), as Modal's own
client roots its errors in ``modal.exception.Error``.  Each error keeps its own
module and name (the module that raises it) and its builtin base (a
`ValueError` stays catchable as one).

Not under the root, on purpose: the stand-ins for a sandboxed task's
``KeyboardInterrupt`` and ``SystemExit`` (`task_runner.call`) and the CLI's
``Stopped`` (`cli.services`) are `BaseException`s, like what they stand for;
under an `Exception` root, ``except Exception`` would swallow them.  Nor is
`RemoteTraceback`, which is no error of ours but the text of the user's
remote traceback, set as the ``__cause__`` of their exception (as
``concurrent.futures`` does).  A remote task's own exception comes back as
itself, or as `RemoteError` when its type cannot travel, and that one is ours.
"""

from __future__ import annotations


class PrefectModalError(Exception):
    """Any error raised by prefect-modal (not by the user's code, Prefect or Modal)."""
