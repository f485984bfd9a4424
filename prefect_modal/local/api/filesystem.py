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

Reads and writes touch regular files only, by descriptor (`safe_files`): a
FIFO, a device or a socket (a symlink to ``/dev/zero`` included) is refused
before it is opened, so no read blocks or never ends. A read streams the file
into the exec's stdout a chunk at a time, and a write's stdin is spooled to a
file of the server's state directory beyond 1 MiB: the server's memory does
not grow with the file. A read of more than `READ_LIMIT_BYTES` answers
``FileTooLarge``, which the client raises as Modal's
``SandboxFilesystemFileTooLargeError``.
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

from ..runtime import safe_files
from ..runtime.isolation import FsRoot
from ..runtime.sandbox import ExecProcess, LocalSandbox

FS_TOOLS_PATH = "/__modal/.bin/modal-sandbox-fs-tools"

#: The most a file-API read returns. Modal: "These APIs may be used to read files of up
#: to 5GB and write files of any size" (guide, Sandbox filesystem access); the client
#: raises ``SandboxFilesystemFileTooLargeError`` (modal/exception.py) for the tool's
#: ``FileTooLarge`` error kind (modal/_utils/sandbox_fs_utils.py, raise_read_file_error).
#: "5GB" is read as 5 * 10**9 bytes, the smaller reading: what reads here reads on Modal.
READ_LIMIT_BYTES = 5 * 10**9


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
    if isinstance(exc, safe_files.NotRegularFile):
        # not a kind the client maps: it raises SandboxFilesystemError(message), so the
        # message names the path (modal/_utils/sandbox_fs_utils.py)
        return _error("InvalidInput", f"{exc.strerror}: {exc.filename}")
    kind, message = _KINDS.get(exc.errno or 0, ("Other", exc.strerror or "I/O error"))
    return _error(kind, message)


def too_large(size: int) -> FsResult:
    """Modal's answer to a read of more than `READ_LIMIT_BYTES` (the client adds the path)."""
    return _error(
        "FileTooLarge",
        f"File too large ({size} bytes; a read returns at most {READ_LIMIT_BYTES} bytes)",
    )


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


def open_for_read(root: FsRoot, path: str) -> tuple[int, int]:
    """A regular file to read (`safe_files.open_regular`) and its size."""
    fd, st = safe_files.open_regular(root, path)
    return fd, st.st_size


def write_file(root: FsRoot, path: str, data: safe_files.Spool) -> None:
    """``WriteFile``: the spooled stdin into ``path``, a regular file (made if missing).

    An existing file (a symlink is followed inside the root) is truncated and written
    through `safe_files.open_regular`; a new one is made with ``O_EXCL | O_NOFOLLOW``
    in its parent's descriptor, so nothing but a regular file is ever written."""
    _makedirs(root, _split(path)[0])
    for _ in range(3):  # a name made or removed by the sandbox meanwhile: look again
        try:
            fd, _st = safe_files.open_regular(root, path, write=True)
        except FileNotFoundError:
            parent, leaf = _split(path)
            with root.opened(parent, os.O_PATH | os.O_DIRECTORY) as pfd:
                try:
                    fd = safe_files.create_regular(pfd, leaf, 0o644)
                except FileExistsError:
                    continue  # a dangling symlink, or a file made just now
        try:
            os.ftruncate(fd, 0)
            data.write_into(fd)
        finally:
            os.close(fd)
        return
    raise FileExistsError(errno.EEXIST, "File exists (a dangling symbolic link?)", path)


def run(name: str, params: dict[str, object], root: FsRoot) -> FsResult:
    """Run one fs-tools command but ``ReadFile`` and ``WriteFile`` (see `answer`);
    blocking file I/O (call it from a thread)."""
    path = params.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        return _error("InvalidArgument", "path must be absolute")
    path = posixpath.normpath(path)
    try:
        if name == "ListFiles":
            with root.opened(path, os.O_RDONLY | os.O_DIRECTORY) as fd:
                names = sorted(os.listdir(fd))
                base = path.rstrip("/")
                entries = []
                for n in names:
                    try:
                        entries.append(_entry(f"{base}/{n}", fd, n))
                    except FileNotFoundError:  # removed since it was listed
                        continue
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
    """Answer an fs-tools exec (after its stdin closed, for writes), once."""
    if ex.done.is_set() or ex.fs_command is None:
        return
    (name, params), ex.fs_command = ex.fs_command, None  # taken: a retried stdin EOF is no 2nd
    spool, ex.fs_stdin = ex.fs_stdin, safe_files.Spool()
    try:
        root = await sb.fs_root()
    except OSError as exc:
        res = _os_error(exc)
    else:
        try:
            if name == "ReadFile":
                res = await _read_file(ex, root, params)
            elif name == "WriteFile":
                res = await _write_file(root, params, spool)
            else:
                res = await asyncio.to_thread(run, name, params, root)
        finally:
            root.close()
            spool.close()
    ex.stdout.append(res.stdout)
    ex.stderr.append(res.stderr)
    ex.stdout.close()
    ex.stderr.close()
    ex.finish(code=res.returncode)


def _path_of(params: dict[str, object]) -> str | None:
    path = params.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        return None
    return posixpath.normpath(path)


async def _read_file(ex: ExecProcess, root: FsRoot, params: dict[str, object]) -> FsResult:
    """``ReadFile``: the file streamed into the exec's stdout, `safe_files.CHUNK_BYTES` at
    a time (the stdout buffer keeps it on disk), never more than `READ_LIMIT_BYTES`."""
    path = _path_of(params)
    if path is None:
        return _error("InvalidArgument", "path must be absolute")
    try:
        fd, size = await asyncio.to_thread(open_for_read, root, path)
    except OSError as exc:
        return _os_error(exc)
    try:
        if size > READ_LIMIT_BYTES:
            return too_large(size)
        total = 0
        while chunk := await asyncio.to_thread(os.read, fd, safe_files.CHUNK_BYTES):
            total += len(chunk)
            if total > READ_LIMIT_BYTES:  # it grows while it is read
                return too_large(total)
            ex.stdout.append(chunk)
            if ex.done.is_set():  # the sandbox ended (its execs with it): nobody reads on
                break
    except OSError as exc:
        return _os_error(exc)
    finally:
        os.close(fd)
    return FsResult(0)


async def _write_file(root: FsRoot, params: dict[str, object], spool: safe_files.Spool) -> FsResult:
    path = _path_of(params)
    if path is None:
        return _error("InvalidArgument", "path must be absolute")
    try:
        await asyncio.to_thread(write_file, root, path, spool)
    except OSError as exc:
        return _os_error(exc)
    return FsResult(0)
