"""What sessions raise.

Their own module because every part of a session (the session, its running
commands, the check of where it may run) raises them, and callers catch them
by type without importing any of those parts.
"""

from __future__ import annotations

from prefect_modal.core.errors import PrefectModalError


class SessionError(PrefectModalError, RuntimeError):
    """A session cannot do what was asked; the message says what to do instead."""


class SessionEndedError(SessionError):
    """The session's sandbox has finished (terminated, timed out, or gone)."""


class SessionUnavailableError(SessionError):
    """Sessions cannot be opened from here (inside a sandbox without Modal credentials)."""
