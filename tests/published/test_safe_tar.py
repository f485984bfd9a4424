"""The published suites' archive extraction is safe on Python 3.11.0+, without
``extractall(filter=...)`` (3.11.4): here that filter is made unavailable."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest
from safe_tar import UnsafeArchiveError, safe_extract


@pytest.fixture(autouse=True)
def _as_before_3_11_4(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on Python 3.11.0-3.11.3: no ``tarfile.data_filter``, no ``filter=`` argument."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    original = tarfile.TarFile.extractall

    def extractall(
        self: tarfile.TarFile,
        path: str | Path = ".",
        members: Iterable[tarfile.TarInfo] | None = None,
        *,
        numeric_owner: bool = False,
        **kw: object,
    ) -> None:
        if kw:
            raise TypeError(f"extractall() got an unexpected keyword argument {next(iter(kw))!r}")
        original(self, path, members, numeric_owner=numeric_owner)

    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)


def _archive(path: Path, *members: tuple[str, bytes] | tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def test_a_normal_member_is_extracted(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "ok.tar.gz", ("pkg-1.0/tests/test_x.py", b"print('ok')\n"))
    dest = tmp_path / "src"
    with tarfile.open(archive) as tar:
        safe_extract(tar, dest, [tar.getmember("pkg-1.0/tests/test_x.py")])
    assert (dest / "pkg-1.0" / "tests" / "test_x.py").read_bytes() == b"print('ok')\n"


@pytest.mark.parametrize(
    "member",
    [
        ("../escape", b"x"),
        ("pkg/../../escape", b"x"),
        ("/tmp/escape-absolute", b"x"),
        _symlink("pkg/link", "../../outside"),
        _symlink("pkg/abs-link", "/etc"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-absolute"],
)
def test_a_member_that_escapes_is_refused_and_nothing_is_written(
    tmp_path: Path, member: tuple[str, bytes] | tarfile.TarInfo
) -> None:
    archive = _archive(tmp_path / "bad.tar.gz", ("pkg/fine.txt", b"fine"), member)
    dest = tmp_path / "work" / "src"
    with tarfile.open(archive) as tar, pytest.raises(UnsafeArchiveError):
        safe_extract(tar, dest, tar.getmembers())
    assert not (dest / "pkg" / "fine.txt").exists()  # refused before anything was written
    assert not (tmp_path / "work" / "escape").exists() and not (tmp_path / "escape").exists()
