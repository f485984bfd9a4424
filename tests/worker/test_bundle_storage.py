"""A Modal Volume as a pool's bundle storage: the upload and execute steps, the CLI that
configures a pool, and a called flow whose bundle travels through the volume."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from typer.testing import CliRunner
from worker_helpers import ModalServer, PrefectServer, create_pool

from prefect_modal.bundles import EXECUTE_STEP, UPLOAD_STEP
from prefect_modal.bundles.execute import download_bundle_from_volume
from prefect_modal.bundles.upload import upload_bundle_to_volume
from prefect_modal.cli.app import app
from prefect_modal.decorators import modal as modal_infra
from prefect_modal.storage import ModalVolume

pytestmark = pytest.mark.slow

POOL = "modal-volume-storage"
VOLUME = "pool-bundles"


@modal_infra(work_pool=POOL)
@flow
def multiply(x: int, y: int) -> int:
    return x * y


@pytest.fixture
def caller(
    api: Any,
    prefect_server: PrefectServer,
    modal_server: ModalServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Any]:
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    for key, value in modal_server.env.items():
        monkeypatch.setenv(key, value)
    # The steps run with `python` on PATH, which must have prefect-modal (this venv).
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    create_pool(api, POOL, {"cpu": 1.0, "memory": "1GiB"})
    with temporary_settings(
        updates={PREFECT_API_URL: prefect_server.url, PREFECT_LOGGING_TO_API_ENABLED: False}
    ):
        yield api


def test_upload_and_download_round_trip_with_included_files(caller: Any, tmp_path: Path) -> None:
    key = str(uuid.uuid4())
    bundle = {"function": "x", "files_key": f"files/{key}.zip"}
    (tmp_path / key).write_text(json.dumps(bundle))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / f"{key}.zip").write_bytes(b"PK-zip-bytes")
    upload_bundle_to_volume(str(tmp_path / key), VOLUME, key, base_path="rt")
    upload_bundle_to_volume(
        str(tmp_path / "files" / f"{key}.zip"), VOLUME, f"files/{key}.zip", "rt"
    )
    out = tmp_path / "out"
    path = download_bundle_from_volume(VOLUME, key, str(out), base_path="rt")
    assert json.loads(path.read_text()) == bundle
    assert (out / "files" / f"{key}.zip").read_bytes() == b"PK-zip-bytes"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        upload_bundle_to_volume(str(tmp_path / "missing"), VOLUME, "k")


def test_configure_cli_refuses_a_missing_pool_with_the_fix(caller: Any) -> None:
    result = CliRunner().invoke(
        app, ["pool", "storage", "configure", "no-such-pool", "--volume", VOLUME]
    )
    assert result.exit_code == 1
    assert "Work pool 'no-such-pool' does not exist" in result.output
    assert "prefect work-pool create no-such-pool --type modal" in result.output


def test_configured_pool_runs_a_called_flow_through_the_volume(
    caller: Any, modal_server: ModalServer
) -> None:
    result = CliRunner().invoke(app, ["pool", "storage", "configure", POOL, "--volume", VOLUME])
    assert result.exit_code == 0, result.output
    assert f"Configured Modal Volume storage for work pool {POOL!r}" in result.output
    pool = caller.read_work_pool(POOL)
    steps = pool.storage_configuration
    assert steps.bundle_upload_step[UPLOAD_STEP]["volume"] == VOLUME
    assert steps.bundle_execution_step[EXECUTE_STEP]["volume"] == VOLUME
    assert steps.default_result_storage_block_id is not None

    state = multiply(6, 7, return_state=True)
    assert state.is_completed(), state
    assert state.result() == 42
    [record] = modal_server.for_run(state.state_details.flow_run_id)
    assert VOLUME in record.volumes.values()
    # The bundle went to the volume's bundles/ folder, the value to its results/ folder.
    bundles = ModalVolume(volume_name=VOLUME, base_path="bundles").list("")
    assert bundles, "no bundle on the volume"
    assert state.data.storage_block_id == steps.default_result_storage_block_id
