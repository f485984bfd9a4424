"""Helpers of the session tests (a module of its own: test modules cannot import
`conftest` by name when the whole suite runs, since every folder has one)."""

from __future__ import annotations

from prefect_modal.local import LocalModal


def running_sessions(server: LocalModal) -> list[str]:
    """Ids of session sandboxes the server says are still running."""
    return [
        s.id
        for s in server.sandboxes()
        if s.tags.get("prefect-modal.mode") == "session" and s.status == "running"
    ]
