"""``sandbox.filesystem``: the server-side stand-in for Modal's ``modal-sandbox-fs-tools``.

``sandbox.filesystem.*`` in modal 1.6.4 has no RPCs of its own: the client
``exec``s ``/__modal/.bin/modal-sandbox-fs-tools '<json command>'`` in the
sandbox, reads the result from stdout, and reads a JSON error payload
(``{"error_kind": ..., "message": ...}``) from stderr on a non-zero exit. The
local sandboxes have no such binary, so the router hands these execs to this
room, which answers them against the sandbox's own root (`FsRoot`): the paths
are the sandbox's, resolved by the kernel inside its root, so they mean what
they mean to the sandbox's processes, and a symlink a sandbox made can never
point the server at a host file.

Commands (JSON, one key): ``ReadFile``, ``WriteFile`` (data on stdin),
``ListFiles``, ``MakeDirectory``, ``Remove``, ``Stat``. ``Watch`` answers
``NotSupported``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import posixpath
import shutil
import stat as stat_mod
from dataclasses import dataclass

from ..runtime.isolation import FsRoot
from ..runtime.sandbox import ExecProcess, LocalSandbox

FS_TOOLS_PATH = "/__modal/.bin/modal-sandbox-fs-tools"
_READ_CHUNK = 1 << 20


@dataclass
class FsResult:
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""


def _error(kind: str, message: str) -> FsResult:
    payload = json.dumps({"error_kind": kind, "message": message})
    return FsResult(1, b"", payload.encode())


_KINDS = {
    errno.ENOENT: ("NotFound", "No such file or directory"),
    errno.EISDIR: ("IsDirectory", "Is a directory"),
    errno.ENOTDIR: ("NotDirectory", "Not a directory"),
    errno.EACCES: ("PermissionDenied", "Permission denied"),
    errno.EPERM: ("PermissionDenied", "Operation not permitted"),
    errno.EROFS: ("PermissionDenied", "Read-only file system"),
    errno.EEXIST: ("PathAlreadyExists", "File exists"),
    errno.ENOTEMPTY: ("DirectoryNotEmpty", "Directory not empty"),
    errno.EXDEV: ("PermissionDenied", "Path escapes the sandbox's root"),
}


def _os_error(exc: OSError) -> FsResult:
    kind, message = _KINDS.get(exc.errno or 0, ("Other", exc.strerror or "I/O error"))
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


def _split(path: str) -> tuple[str, str]:
    parent, name = posixpath.split(posixpath.normpath(path))
    return parent or "/", name


def _entry(container_path: str, dir_fd: int, name: str) -> dict[str, object]:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
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
        "name": posixpath.basename(container_path) or "/",
        "path": container_path,
        "type": kind,
        "size": st.st_size,
        "mode": stat_mod.S_IMODE(st.st_mode),
        "permissions": stat_mod.filemode(st.st_mode)[1:],
        "owner": owner,
        "group": group,
        "modified_time": st.st_mtime,
        "symlink_target": os.readlink(name, dir_fd=dir_fd) if kind == "symlink" else None,
    }


def _stat_root(root: FsRoot) -> dict[str, object]:
    with root.opened("/", os.O_PATH | os.O_DIRECTORY) as fd:
        st = os.stat(fd)
    return {
        "name": "/",
        "path": "/",
        "type": "directory",
        "size": st.st_size,
        "mode": stat_mod.S_IMODE(st.st_mode),
        "permissions": stat_mod.filemode(st.st_mode)[1:],
        "owner": "root",
        "group": "root",
        "modified_time": st.st_mtime,
        "symlink_target": None,
    }


def is_dir(root: FsRoot, path: str) -> bool:
    try:
        with root.opened(path, os.O_PATH) as fd:
            return stat_mod.S_ISDIR(os.stat(fd).st_mode)
    except OSError:
        return False


def _makedirs(root: FsRoot, path: str, exist_ok: bool = True) -> None:
    """``mkdir -p`` inside the root, one component at a time (each resolved in it)."""
    done = "/"
    for part in [p for p in posixpath.normpath(path).split("/") if p]:
        target = posixpath.join(done, part)
        if is_dir(root, target):
            if target == posixpath.normpath(path) and not exist_ok:
                raise FileExistsError(errno.EEXIST, "File exists", path)
        else:
            with root.opened(done, os.O_PATH | os.O_DIRECTORY) as parent:
                os.mkdir(part, 0o755, dir_fd=parent)
                root.give_at(parent, part)
        done = target


def run(name: str, params: dict[str, object], root: FsRoot, stdin: bytes = b"") -> FsResult:
    """Run one fs-tools command; blocking file I/O (call it from a thread)."""
    path = params.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        return _error("InvalidArgument", "path must be absolute")
    path = posixpath.normpath(path)
    try:
        if name == "ReadFile":
            with root.opened(path, os.O_RDONLY) as fd:
                if stat_mod.S_ISDIR(os.fstat(fd).st_mode):
                    return _error("IsDirectory", "Is a directory")
                chunks = []
                while chunk := os.read(fd, _READ_CHUNK):
                    chunks.append(chunk)
            return FsResult(0, b"".join(chunks))
        if name == "WriteFile":
            if is_dir(root, path):
                return _error("IsDirectory", "Is a directory")
            _makedirs(root, _split(path)[0])
            with root.opened(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as fd:
                view = memoryview(stdin)
                while view:
                    view = view[os.write(fd, view) :]
            return FsResult(0)
        if name == "ListFiles":
            with root.opened(path, os.O_RDONLY | os.O_DIRECTORY) as fd:
                names = sorted(os.listdir(fd))
                base = path.rstrip("/")
                entries = [_entry(f"{base}/{n}", fd, n) for n in names]
            return FsResult(0, json.dumps(entries).encode())
        if name == "MakeDirectory":
            if params.get("parents", True):
                _makedirs(root, path)
            else:
                parent, leaf = _split(path)
                with root.opened(parent, os.O_PATH | os.O_DIRECTORY) as fd:
                    os.mkdir(leaf, 0o755, dir_fd=fd)
                    root.give_at(fd, leaf)
            return FsResult(0)
        if name == "Remove":
            if path == "/":
                return _error("PermissionDenied", "Operation not permitted")
            parent, leaf = _split(path)
            with root.opened(parent, os.O_RDONLY | os.O_DIRECTORY) as fd:
                st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
                if stat_mod.S_ISDIR(st.st_mode):
                    if params.get("recursive"):
                        shutil.rmtree(leaf, dir_fd=fd)
                    else:
                        os.rmdir(leaf, dir_fd=fd)
                else:
                    os.unlink(leaf, dir_fd=fd)
            return FsResult(0)
        if name == "Stat":
            if path == "/":
                return FsResult(0, json.dumps(_stat_root(root)).encode())
            parent, leaf = _split(path)
            with root.opened(parent, os.O_RDONLY | os.O_DIRECTORY) as fd:
                return FsResult(0, json.dumps(_entry(path, fd, leaf)).encode())
    except OSError as exc:
        return _os_error(exc)
    return _error("NotSupported", f"{name} is not supported by the local server")


# ----- the exec the client makes -----------------------------------------------------


def is_fs_tools(args: list[str]) -> bool:
    return bool(args) and args[0] == FS_TOOLS_PATH


async def start(sb: LocalSandbox, ex: ExecProcess, args: list[str]) -> None:
    """An fs-tools exec: parse the command; run it now unless it waits for its stdin."""
    try:
        ex.fs_command = parse_command(args[1] if len(args) > 1 else "")
    except (ValueError, TypeError):
        ex.stderr.append(b'{"error_kind": "InvalidArgument", "message": "bad fs-tools command"}')
        ex.stdout.close()
        ex.stderr.close()
        ex.finish(code=2)
        return
    if ex.fs_command[0] != "WriteFile":  # everything but a write needs no stdin
        await answer(sb, ex)


async def answer(sb: LocalSandbox, ex: ExecProcess) -> None:
    """Answer an fs-tools exec (after its stdin closed, for writes)."""
    if ex.done.is_set() or ex.fs_command is None:
        return
    name, params = ex.fs_command
    try:
        root = await sb.fs_root()
    except OSError as exc:
        res = _os_error(exc)
    else:
        try:
            res = await asyncio.to_thread(run, name, params, root, bytes(ex.fs_stdin))
        finally:
            root.close()
    ex.stdout.append(res.stdout)
    ex.stderr.append(res.stderr)
    ex.stdout.close()
    ex.stderr.close()
    ex.finish(code=res.returncode)
