"""Read prefect-modal's sandbox events back through the Prefect API (shared by test dirs)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect_modal.events import EVENT_PREFIX


def sandbox_events(since: datetime) -> list[dict[str, Any]]:
    """Every `prefect-modal.sandbox.*` event the server stored since `since`, oldest first."""
    from prefect.client.orchestration import get_client

    body = {
        "filter": {
            "occurred": {
                "since": (since - timedelta(seconds=5)).isoformat(),
                "until": (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat(),
            },
            "event": {"prefix": [EVENT_PREFIX]},
            "order": "ASC",
        },
        "limit": 50,  # the API's maximum; further pages follow `next_page`
    }
    events: list[dict[str, Any]] = []
    with get_client(sync_client=True) as client:
        page = client.request("POST", "/events/filter", json=body).json()
        events.extend(page.get("events", []))
        while page.get("next_page"):
            page = client._client.get(page["next_page"]).json()
            events.extend(page.get("events", []))
    return events


def related_ids(event: dict[str, Any], role: str) -> list[str]:
    return [
        r["prefect.resource.id"]
        for r in event.get("related", [])
        if r.get("prefect.resource.role") == role
    ]


def wait_for_events(
    since: datetime, wanted: Any, timeout: float = 60, what: str = "sandbox events"
) -> list[dict[str, Any]]:
    """Poll until `wanted(events)` is true (the server persists events in batches)."""
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        events = sandbox_events(since)
        if wanted(events):
            return events
        time.sleep(1)
    names = [(e["event"], e["resource"]["prefect.resource.id"]) for e in events]
    raise AssertionError(f"no {what} within {timeout:.0f}s; got {names}")
