"""Images built from their definition (real modal client, local server).

An image holds what its definition says and nothing of the flow's environment:
the packages pip_install names at their versions, not the server's pydantic;
run_commands run at build time with their output as build logs; env and
workdir reach sandboxes; a built image is found in the shared layer cache.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import modal
import pytest

from prefect_modal.local import LocalModal
from prefect_modal.local.build import pythons


def _run(app: Any, client: Any, image: modal.Image, *args: str, **kw: Any) -> tuple[int, str, str]:
    sb = modal.Sandbox.create(*args, app=app, client=client, image=image, **kw)
    sb.wait(raise_on_termination=False)
    return sb.returncode, sb.stdout.read(), sb.stderr.read()


@pytest.fixture
def isolated(local_modal: LocalModal) -> LocalModal:
    if local_modal.isolation is None:
        pytest.skip(reason=f"needs isolated sandboxes: {local_modal.not_isolated_because}")
    return local_modal


def test_pinned_pip_install_is_there_and_the_flow_env_is_not(
    isolated: LocalModal, app: Any
) -> None:
    image = modal.Image.debian_slim().pip_install("six==1.16.0")
    code, out, err = _run(
        app,
        isolated.client,
        image,
        "python",
        "-c",
        "import six, sys; print(six.__version__, sys.prefix); import pydantic",
    )
    assert code == 1
    version, prefix = out.split()
    assert version == "1.16.0"
    assert prefix.startswith(str(isolated.image_cache))  # the image's own environment
    assert "ModuleNotFoundError: No module named 'pydantic'" in err  # the server has it


def test_run_commands_output_is_a_build_log_and_their_files_are_in_the_image(
    isolated: LocalModal, app: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = uuid.uuid4().hex
    image = modal.Image.debian_slim().run_commands(
        f"echo built-{marker}", f"echo {marker} > /opt/made-at-build.txt"
    )
    with modal.enable_output():
        code, out, err = _run(app, isolated.client, image, "cat", "/opt/made-at-build.txt")
    assert (code, out.strip()) == (0, marker), err
    assert f"built-{marker}" in capsys.readouterr().out  # streamed as build logs


def test_a_failing_run_command_fails_the_build_with_its_output(
    isolated: LocalModal, app: Any
) -> None:
    marker = uuid.uuid4().hex
    image = modal.Image.debian_slim().run_commands(f"echo about-to-fail-{marker} >&2; exit 7")
    with pytest.raises(modal.exception.ImageBuildError) as info:
        modal.Sandbox.create("true", app=app, client=isolated.client, image=image)
    assert "exit code 7" in str(info.value)
    # the end of the build log goes with the error: a worker or a per-step runner
    # shows only the exception (no enable_output()), and it must say why
    assert f"about-to-fail-{marker}" in str(info.value)


def test_a_long_build_is_announced_in_the_run_log_and_a_built_one_is_not(
    isolated: LocalModal, app: Any
) -> None:
    from prefect_modal.core import modal_api

    marker = uuid.uuid4().hex
    lines: list[str] = []
    slow = modal.Image.debian_slim().run_commands(f"sleep 3 && echo {marker}")
    modal_api.ensure_built(slow, app, lines.append, "slow-image")
    assert lines[0].startswith("Building image slow-image (a first build;"), lines
    assert lines[-1].startswith(f"Built image {slow.object_id} in "), lines

    lines.clear()
    again = modal.Image.debian_slim().run_commands(f"sleep 3 && echo {marker}")
    modal_api.ensure_built(again, app, lines.append, "slow-image")
    assert again.object_id == slow.object_id
    assert lines == []  # found built: nothing to say


def test_env_and_workdir_reach_the_sandbox(isolated: LocalModal, app: Any) -> None:
    image = modal.Image.debian_slim().env({"IMAGE_VAR": "from-image"}).workdir("/srv/app")
    code, out, err = _run(app, isolated.client, image, "sh", "-c", 'echo "$IMAGE_VAR $(pwd)"')
    assert (code, out.strip()) == (0, "from-image /srv/app"), err
    code, out, _ = _run(app, isolated.client, image, "pwd", workdir="/tmp")
    assert out.strip() == "/tmp"  # the sandbox's own workdir wins


def test_a_second_create_of_a_built_image_does_not_rebuild(
    isolated: LocalModal, app: Any, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex
    image = modal.Image.debian_slim().run_commands(f"echo {marker}")
    assert _run(app, isolated.client, image, "true")[0] == 0
    before = isolated.image_builds
    again = modal.Image.debian_slim().run_commands(f"echo {marker}")  # a new object: a new RPC
    assert _run(app, isolated.client, again, "true")[0] == 0
    after = isolated.image_builds
    assert after["builds"] == before["builds"]
    assert after["hits"] > before["hits"]
    # another server with the same cache finds it too (as every test's server does)
    with LocalModal(image_cache=isolated.image_cache, state_dir=tmp_path / "s") as other:
        other_app = modal.App.lookup("again", create_if_missing=True, client=other.client)
        image2 = modal.Image.debian_slim().run_commands(f"echo {marker}")
        assert _run(other_app, other.client, image2, "true")[0] == 0
        assert other.image_builds["builds"] == 0
        assert other.image_builds["hits"] >= 1


@pytest.fixture
def only_system_python(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """This machine as if pyenv had none of its versions: /usr/bin's Python only."""
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "no-pyenv"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    pythons.available.cache_clear()
    found = sorted(pythons.available())
    pythons.available.cache_clear()
    missing = [v for v in ("3.10", "3.12", "3.13") if v not in found]
    if not missing:
        pytest.skip(reason="/usr/bin has every Python series Modal supports")
    yield missing[0]
    pythons.available.cache_clear()


def test_a_python_version_this_machine_lacks_is_a_clear_error(
    local_modal: LocalModal, app: Any, only_system_python: str
) -> None:
    pythons.available.cache_clear()
    available = pythons.describe_available()
    image = modal.Image.debian_slim(python_version=only_system_python)
    with pytest.raises(modal.exception.ImageBuildError) as info:
        modal.Sandbox.create("true", app=app, client=local_modal.client, image=image)
    message = str(info.value)
    assert f"no Python {only_system_python}" in message
    assert f"Versions it can build: {available}" in message


def test_a_registry_image_says_it_was_not_pulled(isolated: LocalModal, app: Any) -> None:
    image = modal.Image.from_registry("ubuntu:22.04")
    code, _, err = _run(app, isolated.client, image, "true")
    assert code == 0
    assert "image 'ubuntu:22.04' could not be pulled here" in err
