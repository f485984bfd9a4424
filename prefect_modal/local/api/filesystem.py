"""The server-side stand-in for Modal's ``modal-sandbox-fs-tools`` binary.

``sandbox.filesystem.*`` in modal 1.6.4 does not have RPCs of its own: the
client ``exec``s ``/__modal/.bin/modal-sandbox-fs-tools '<json command>'`` in
the sandbox, reads the result from stdout, and reads a JSON error payload
(``{"error_kind": ..., "message": ...}``) from stderr on a non-zero exit. The
local sandboxes have no such binary, so the server answers these execs itself,
against the sandbox's root directory on the host (see `runtime.SandboxPaths`).

Commands (JSON, one key): ``ReadFile``, ``WriteFile`` (data on stdin),
``ListFiles``, ``MakeDirectory``, ``Remove``, ``Stat``. ``Watch`` answers
``NotSupported``. Paths cannot climb out of the root with ``..``, but symlinks
(volumes are symlinks) are followed: this is an emulation, not a sandbox
boundary.
"""

from __future__ import annotations

import json
import os
import shutil
import stat as stat_mod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FS_TOOLS_PATH = "/__modal/.bin/modal-sandbox-fs-tools"

Resolver = Callable[[str], Path]
"""Maps an absolute path inside the sandbox to a path on this machine."""


@dataclass
class FsResult:
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""


class FsToolError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _error(kind: str, message: str) -> FsResult:
    payload = json.dumps({"error_kind": kind, "message": message})
    return FsResult(1, b"", payload.encode())


def _os_error(exc: OSError) -> FsResult:
    import errno

    kinds = {
        errno.ENOENT: ("NotFound", "No such file or directory"),
        errno.EISDIR: ("IsDirectory", "Is a directory"),
        errno.ENOTDIR: ("NotDirectory", "Not a directory"),
        errno.EACCES: ("PermissionDenied", "Permission denied"),
        errno.EPERM: ("PermissionDenied", "Operation not permitted"),
        errno.EEXIST: ("PathAlreadyExists", "File exists"),
        errno.ENOTEMPTY: ("DirectoryNotEmpty", "Directory not empty"),
    }
    kind, message = kinds.get(exc.errno or 0, ("Other", exc.strerror or "I/O error"))
    return _error(kind, message)


def parse_command(arg: str) -> tuple[str, dict[str, object]]:
    """Split ``{"ReadFile": {"path": ...}}`` into ``("ReadFile", {...})``."""
    data = json.loads(arg)
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError("expected one command")
    ((name, params),) = data.items()
    if not isinstance(params, dict):
        raise ValueError("command parameters must be an object")
    return name, params


def _perm_string(mode: int) -> str:
    return stat_mod.filemode(mode)[1:]


def _entry(container_path: str, host: Path) -> dict[str, object]:
    st = host.lstat()
    if stat_mod.S_ISLNK(st.st_mode):
        kind = "symlink"
    elif stat_mod.S_ISDIR(st.st_mode):
        kind = "directory"
    else:
        kind = "file"
    try:
        import grp
        import pwd

        owner = pwd.getpwuid(st.st_uid).pw_name
        group = grp.getgrgid(st.st_gid).gr_name
    except (KeyError, ImportError):
        owner, group = str(st.st_uid), str(st.st_gid)
    return {
        "name": Path(container_path).name or "/",
        "path": container_path,
        "type": kind,
        "size": st.st_size,
        "mode": stat_mod.S_IMODE(st.st_mode),
        "permissions": _perm_string(st.st_mode),
        "owner": owner,
        "group": group,
        "modified_time": st.st_mtime,
        "symlink_target": os.readlink(host) if kind == "symlink" else None,
    }


def run(name: str, params: dict[str, object], resolve: Resolver, stdin: bytes = b"") -> FsResult:
    """Run one fs-tools command; blocking file I/O (call it from a thread)."""
    path = params.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        return _error("InvalidArgument", "path must be absolute")
    host = resolve(path)
    try:
        if name == "ReadFile":
            if host.is_dir():
                return _error("IsDirectory", "Is a directory")
            return FsResult(0, host.read_bytes())
        if name == "WriteFile":
            if host.is_dir():
                return _error("IsDirectory", "Is a directory")
            host.parent.mkdir(parents=True, exist_ok=True)
            host.write_bytes(stdin)
            return FsResult(0)
        if name == "ListFiles":
            if not host.exists():
                return _error("NotFound", "No such file or directory")
            if not host.is_dir():
                return _error("NotDirectory", "Not a directory")
            base = path.rstrip("/")
            entries = [_entry(f"{base}/{child.name}", child) for child in sorted(host.iterdir())]
            return FsResult(0, json.dumps(entries).encode())
        if name == "MakeDirectory":
            parents = bool(params.get("parents", True))
            if host.exists() and not parents:
                return _error("PathAlreadyExists", "File exists")
            if host.exists() and not host.is_dir():
                return _error("NotDirectory", "Not a directory")
            host.mkdir(parents=parents, exist_ok=parents)
            return FsResult(0)
        if name == "Remove":
            if not host.exists() and not host.is_symlink():
                return _error("NotFound", "No such file or directory")
            if host.is_dir() and not host.is_symlink():
                if params.get("recursive"):
                    shutil.rmtree(host)
                else:
                    host.rmdir()
            else:
                host.unlink()
            return FsResult(0)
        if name == "Stat":
            if not host.exists() and not host.is_symlink():
                return _error("NotFound", "No such file or directory")
            return FsResult(0, json.dumps(_entry(path, host)).encode())
    except OSError as exc:
        return _os_error(exc)
    return _error("NotSupported", f"{name} is not supported by the local server")
