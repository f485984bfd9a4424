"""What a person sees in Prefect's UI after a per-step flow: its sandbox and the sandbox's output.

A real Prefect server (its UI enabled) and the local Modal server; a flow with
`ModalTaskRunner` runs in this process against them; headless Chromium (Debian's,
driven by Playwright) opens the flow run's page: the Logs tab must show the line
the task printed inside its sandbox, the Artifacts tab the sandbox's record.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from live_servers import LiveServers, flow_run_id_of, pointed_at
from prefect import flow, task

from prefect_modal import ModalTaskRunner
from prefect_modal.core.artifacts import read_sandbox_artifacts, warm_artifact_key

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MARKER = "ui-check-7f3a"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)"),
]


@task
def shout(word: str) -> str:
    print(f"{MARKER}: {word} printed inside the sandbox")
    return word.upper()


@flow(task_runner=ModalTaskRunner(), log_prints=True)
def ui_flow(word: str) -> str:
    return shout.submit(word).result()


def test_flow_run_page_shows_sandbox_artifact_and_its_logs(
    servers: LiveServers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with pointed_at(servers, monkeypatch):
        state = ui_flow("zebra", return_state=True)
        assert state.is_completed(), state.message
        assert state.result() == "ZEBRA"
        run_id = flow_run_id_of(state)
        records = read_sandbox_artifacts(run_id)

    # The one sandbox, as the local server and the artifact both know it.
    (listed,) = servers.sandboxes_of(run_id)
    (record,) = records  # a warm sandbox (the default): one artifact listing its calls
    assert record.sandbox_id == listed.id and listed.status == "exited"
    assert record.status == "succeeded" and record.task_name == "shout"
    (call,) = record.calls or []
    assert call.task_name == "shout" and call.status == "succeeded" and call.task_run_id
    key = record.key
    assert key == warm_artifact_key(listed.id)
    line = f"{MARKER}: zebra printed inside the sandbox"

    assert CHROMIUM is not None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{servers.ui_url}/runs/flow-run/{run_id}", wait_until="domcontentloaded")
            # The UI found its API (PREFECT_UI_API_URL): the run's name is on the page.
            expect(page.get_by_text("Completed").first).to_be_visible(timeout=60_000)

            # Logs tab (the default): the task's print, streamed from the sandbox.
            expect(page.get_by_text("Logs", exact=True).first).to_be_visible()
            expect(page.get_by_text(line).first).to_be_visible(timeout=30_000)
            expect(page.get_by_text(f"Running in Modal sandbox {listed.id}").first).to_be_visible()
            page.screenshot(path=tmp_path / "flow-run-logs.png", full_page=True)

            # Artifacts tab: the sandbox record, by its key and with the sandbox id.
            page.get_by_text("Artifacts", exact=True).first.click()
            expect(page).to_have_url(f"{servers.ui_url}/runs/flow-run/{run_id}?tab=Artifacts")
            expect(page.get_by_text(key, exact=True).first).to_be_visible(timeout=30_000)
            page.screenshot(path=tmp_path / "flow-run-artifacts.png", full_page=True)

            # The artifact itself: the sandbox's record as a field / value table.
            page.get_by_text(key, exact=True).first.click()
            expect(page).to_have_url(re.compile(r"/artifacts/artifact/[0-9a-f-]{36}$"))
            rows = page.get_by_role("table").get_by_role("row")
            expect(rows.filter(has_text="sandbox_id")).to_contain_text(listed.id, timeout=30_000)
            status_row = rows.filter(has=page.get_by_text("status", exact=True))
            expect(status_row).to_contain_text("succeeded")
            calls_row = rows.filter(has=page.get_by_text("calls", exact=True))
            expect(calls_row).to_contain_text(str(call.task_run_id))
            expect(rows.filter(has_text="flow_run_id")).to_contain_text(run_id)
            page.screenshot(path=tmp_path / "sandbox-artifact.png", full_page=True)
        finally:
            browser.close()
    for shot in ("flow-run-logs.png", "flow-run-artifacts.png", "sandbox-artifact.png"):
        assert (tmp_path / shot).stat().st_size > 10_000, shot
    print(f"screenshots: {tmp_path}")
