"""Make a forked process a container: its own root, process view, IPC, hostname, network.

Not imported by the server: like `zygote`, this file's text runs inside the
fork server's interpreter (standard library only, no prefect_modal), because
it must run in the forked child between ``fork`` and the sandbox's code.
Doing it there with the namespace calls themselves costs a few hundred
microseconds; a ``bwrap`` exec per sandbox costs 3-15 ms on this machine,
which for a forked ``python -c`` sandbox would be most of its life.

A sandbox is three processes (host pids in the server's view):

* the *monitor* (the fork server's child, the pid the server supervises): it
  calls ``unshare`` and forks the init; when the init reports the
  entrypoint's end, it ends the same way (exit code, or the same signal), so
  the server sees the entrypoint's status as Popen reports it;
* the *init*, pid 1 of the new PID namespace: it builds the root (below),
  then forks the entrypoint and reaps orphans; when the entrypoint exits it
  exits, and the kernel kills whatever is left in the namespace, as Modal
  tears down a container with its entrypoint;
* the *entrypoint*, pid 2: its own session, no more privileges than a
  container gets, the sandbox's working directory; then the code or program.

The root: a bind of the sandbox's own directory (its writable layer), the
image's directories bound read-only at their paths (recursively read-only,
with ``mount_setattr``; a read-only overlay instead where the image's layers
add files there, as ``apt_install`` does under ``/usr``; in the build sandbox
that installs an ``apt_install``'s packages a writable overlay whose upper
directory is the new layer's), volumes bound
read-write, files that hold host secrets (``/etc/shadow``...) masked, a
private ``/proc`` (with ``/proc/sys`` read-only), a small ``/dev`` of its
own, then ``pivot_root`` and the host's tree detached. Nothing of the host
outside those binds is reachable.

``exec`` joins a running sandbox: the fork server's child enters the init's
namespaces (``setns``; the mount namespace puts it at the sandbox's root),
forks (the PID namespace applies to children), and the grandchild drops its
privileges as the entrypoint did.

Privileges: the processes stay uid 0 (as on Modal) with a container's
capability set (`KEPT_CAPS`, the usual Docker default minus ``MKNOD``,
``NET_RAW`` and ``SETPCAP``) and ``no_new_privs``: they can chown and write
their own files, but not mount, load modules, trace other processes, make
device nodes or change what the kernel does. The program and the init also
load the server's seccomp filter (`seccomp_filter`, Docker's default profile)
after ``no_new_privs``, just before the program runs.

Nothing the sandbox writes is trusted: the init and the monitor are not
dumpable (their memory, descriptors and pipes are closed to the sandbox's
processes), the info pipe is closed before the program exists, and the
sandbox's end reaches the server only as the monitor's exit status.
"""

import base64
import ctypes
import errno
import fcntl
import os
import platform
import signal
import socket
import stat
import struct
import warnings  # noqa: F401  (os.execvpe imports it: after pivot_root our stdlib may be gone)

#: the exit code of a process whose working directory could not be made (as for
#: a command that cannot be run: Modal publishes no code for it)
WORKDIR_FAILED = 126
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_SYSCALLS = {  # the generic table (aarch64...) and x86_64
    "pivot_root": {"x86_64": 155, "aarch64": 41},
    "mount_setattr": {"x86_64": 442, "aarch64": 442},
    "keyctl": {"x86_64": 250, "aarch64": 219},
    "open_tree": {"x86_64": 428, "aarch64": 428},
    "move_mount": {"x86_64": 429, "aarch64": 429},
}
_MOUNT_ATTR_IDMAP = 0x00100000
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 0x1
_OPEN_TREE_CLOEXEC = 0o2000000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_TIOCSCTTY = 0x540E

#: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, NET_BIND_SERVICE,
#: SYS_CHROOT, AUDIT_WRITE, SETFCAP
KEPT_CAPS = (0, 1, 3, 4, 5, 6, 7, 10, 18, 29, 31)

#: Where a container's root is bound in its mount namespace when the host's path to it is
#: not one root inside may walk (a user namespace's root, `_pin_sources`); detached with
#: the host's tree at `_pivot`.
STAGE = "/tmp"

#: Device files a container's /dev has, bound from the host's.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

_libc = ctypes.CDLL(None, use_errno=True)


class ContainerError(Exception):
    """A step of making the container failed; the message says which."""


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise ContainerError(f"{what}: {os.strerror(err)}")


def _b(text):
    return None if text is None else os.fsencode(text)


def _syscall_no(name):
    return _SYSCALLS[name].get(platform.machine())


def mount(source, target, fstype, flags, data=None):
    _check(
        _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
        f"mount {target}",
    )


def _make_readonly(target):
    """Read-only, recursively (submounts too: a host's /etc may hold bind-mounted files)."""
    number = _syscall_no("mount_setattr")
    if number is not None:
        attr = struct.pack(
            "QQQQ", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0
        )
        buf = ctypes.create_string_buffer(attr, len(attr))
        if _libc.syscall(number, _AT_FDCWD, _b(target), _AT_RECURSIVE, buf, len(attr)) == 0:
            return
    # older kernels: the mount itself, then every submount below it
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    prefix = target.rstrip("/") + "/"
    for point in points:
        if point.startswith(prefix):
            mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _mount_point(target, like_dir):
    if like_dir:
        os.makedirs(target, exist_ok=True)
    elif not os.path.lexists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))


def _bind(source, target, readonly):
    _mount_point(target, os.path.isdir(source))
    mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        _make_readonly(target)


def _overlay(lowerdir, target):
    """A read-only overlay at ``target``: the image layers' files over the host's
    directory (``lowerdir`` lists them top-most first, the host's last). With
    lower layers only, overlayfs itself is read-only: the sandbox can change
    neither the layers nor the host's files."""
    os.makedirs(target, exist_ok=True)
    options = "lowerdir=" + lowerdir
    if _IN_USERNS:  # the layers' opaque marks are user.overlay.* there (`_overlay_rw`)
        options += ",userxattr"
    mount("overlay", target, "overlay", MS_RDONLY | MS_NOSUID | MS_NODEV, options)


def _overlay_rw(options, target):
    """A writable overlay at ``target``, for a build sandbox only (``apt_install``'s
    package installs): ``options`` name the lower directories (the image layers'
    and the host's, all left unchanged), the upper directory that receives every
    change (the new layer's: deletions of lower files become whiteouts there, which
    overlayfs honours when that layer is later a lower one) and its work directory."""
    os.makedirs(target, exist_ok=True)
    if _IN_USERNS:  # overlayfs's own xattrs there are user.overlay.* (Linux 5.11)
        options += ",userxattr"
    mount("overlay", target, "overlay", MS_NOSUID | MS_NODEV, options)


def _mask(target):
    """Hide a host file or directory that the image's binds would otherwise show."""
    if os.path.isdir(target):
        mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=755")
    elif os.path.lexists(target):
        mount("/dev/null", target, None, MS_BIND)


def _make_dev(root):
    dev = root + "/dev"
    os.makedirs(dev, exist_ok=True)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=64k")
    for name in DEVICES:
        _bind("/dev/" + name, f"{dev}/{name}", readonly=False)
    os.makedirs(dev + "/pts")
    mount(
        "devpts",
        dev + "/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )
    os.symlink("pts/ptmx", dev + "/ptmx")
    os.makedirs(dev + "/shm")
    mount("tmpfs", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dev}/{name}")


def _make_proc(root):
    proc = root + "/proc"
    os.makedirs(proc, exist_ok=True)
    mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # what a container runtime hides or freezes: kernel settings and the host's memory
    for name in ("sys", "sysrq-trigger", "irq", "bus"):
        path = f"{proc}/{name}"
        if os.path.lexists(path):
            mount(path, path, None, MS_BIND | MS_REC)
            _make_readonly(path)
    for name in ("kcore", "keys", "timer_list", "sched_debug"):
        path = f"{proc}/{name}"
        if os.path.exists(path):
            mount("/dev/null", path, None, MS_BIND)


def _pivot(root):
    os.chdir(root)
    number = _syscall_no("pivot_root")
    if number is None:  # an architecture we have no number for: chroot (no caps: no escape)
        os.chroot(".")
    else:
        _check(_libc.syscall(number, b".", b"."), "pivot_root")
        _check(_libc.umount2(b".", MNT_DETACH), "detaching the host's root")
    os.chdir("/")


def _loopback_up():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        if flags & _IFF_UP:  # a namespace made ahead (`netns_pool`): up, and not ours to set
            return
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def build_root(spec):
    """In the init, in its new mount namespace: lay out the root and enter it."""
    root = spec["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here reaches the host
    if spec.get("root_source"):  # `_pin_sources`: the pinned copy is a mount of its own
        _attach_pinned()
        root = spec["root_source"]
    else:
        mount(root, root, None, MS_BIND | MS_REC)
    for kind, source, path in spec["mounts"]:
        target = root + path
        if kind == "mask":
            _mask(target)
        elif kind == "overlay":
            _overlay(source, target)
        elif kind == "overlay_rw":
            _overlay_rw(source, target)
        else:
            _bind(source, target, readonly=kind == "ro")
    _make_proc(root)
    _make_dev(root)
    _pivot(root)


def drop_privileges(keep=KEPT_CAPS):
    """A container's capabilities (bounding, effective, permitted; none inheritable or
    ambient) and ``no_new_privs``, so nothing exec'd can gain more."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    for cap in range(64):
        if cap in keep:
            continue
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EINVAL:
                break  # past the last capability this kernel knows
            _check(-1, f"dropping capability {cap}")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    header = ctypes.create_string_buffer(struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0), 8)
    low, high = mask & 0xFFFFFFFF, mask >> 32
    data = ctypes.create_string_buffer(struct.pack("IIIIII", low, low, 0, high, high, 0), 24)
    _check(_libc.capset(header, data), "capset")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(request):
    """Load the request's seccomp filter (`seccomp_filter`: a BPF program the server
    generated with libseccomp, base64) into this process; after ``no_new_privs``,
    which lets a process without ``CAP_SYS_ADMIN`` install one. It holds for this
    process and everything it starts, exec or not, and cannot be removed."""

    text = request.get("seccomp")
    if not text:
        return  # libseccomp is missing on this machine: the server has said so
    program = base64.b64decode(text)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
        "loading the seccomp filter",
    )


def _not_dumpable():
    """No ``/proc/<pid>/mem``, ``fd``, ``environ`` or ptrace for the sandbox's processes:
    the init holds the server's pipes and was copied from a fork server. (The monitor,
    which no process of the sandbox can name, stays dumpable: see `start`.)"""
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def _die_with_parent(parent, outside=False):
    """SIGKILL when ``parent`` dies (and now, if it already has).

    ``outside``: the parent is outside this process's PID namespace, so
    ``getppid`` says 0; the host's /proc (still mounted: the root is not
    built yet) tells whether it lives. ``parent=None``: a parent outside
    that cannot be looked up (it waits for us, so it lives).
    """
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is None:
        return
    if outside:
        try:
            with open(f"/proc/{parent}/stat", "rb") as f:
                alive = b") Z " not in f.read()
        except OSError:
            alive = False
    else:
        alive = os.getppid() == parent
    if not alive:
        os._exit(137)


def _end_like(status):
    """End this process as the one whose wait status this is ended (Popen: code or -signal)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _quiet_stdio():
    """The monitor and init hold no end of the sandbox's pipes: EOF comes with the program."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _write(fd, text):
    if fd is not None:
        try:
            os.write(fd, text.encode())
        except OSError:
            pass


def _init(child, status_w):
    """pid 1: reap everything; when the entrypoint ends, report its status to the
    monitor on ``status_w`` and end. The monitor's own exit, seen by the fork
    server that started it, is the server's news of the end: nothing a sandbox's
    process could write (this pipe is out of their reach: the init is not
    dumpable, so its ``/proc/1/fd`` is closed to them)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if pid == child:
            _write(status_w, str(status))
            os._exit(0)


def _monitor(child, status_r):
    """Outside the namespaces: end as the entrypoint ended, as soon as the init says how.

    Not when the init is gone: tearing a container's namespaces down takes the
    kernel tens of milliseconds (RCU grace periods), and the entrypoint's exit
    is the sandbox's end. The init finishes the teardown on its own; the fork
    server kills this process group (the init too) when this process ends.
    """
    _quiet_stdio()
    data = b""
    try:
        data = os.read(status_r, 64)
    except OSError:
        pass
    if not data:  # the init was killed (terminate, timeout): so was everything in it
        os.kill(os.getpid(), signal.SIGKILL)
    _end_like(int(data))


def join_cgroups(paths):
    """Put this process into the sandbox's cgroups (`cgroups.Group.procs`): ``0`` written
    to each ``cgroup.procs`` moves the writer. Called first in the fork server's child,
    before it unshares or forks anything, so every process of the sandbox starts inside
    its limits. A failure ends the child (it never runs without the limits it was given).
    """
    for path in paths:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError as exc:
            raise ContainerError(f"joining the sandbox's cgroup {path}: {exc.strerror}") from None


def workdir_failure(workdir, exc):
    """Modal's runtime's words for a working directory it cannot create (modal-client
    issue #3322: ``starting sandbox: failed to create process working directory
    "/mnt/data": not a directory``)."""
    why = (exc.strerror or str(exc)).lower()
    return f'starting sandbox: failed to create process working directory "{workdir}": {why}'


def _enter_workdir(workdir):
    """Enter the workdir, creating a missing one as Modal's runtime does; a path that
    cannot be a directory (a file on the way, a read-only directory) fails the process
    with Modal's message."""
    try:
        os.chdir(workdir)
        return
    except FileNotFoundError:
        pass
    except OSError as exc:
        _workdir_failed(workdir, exc)
    try:
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
    except OSError as exc:
        _workdir_failed(workdir, exc)


def _workdir_failed(workdir, exc):
    os.write(2, f"[prefect-modal local] {workdir_failure(workdir, exc)}\n".encode())
    os._exit(WORKDIR_FAILED)


def _become_program(request, parent):
    """The entrypoint or exec'd process: own session, fewer privileges, its workdir."""
    _die_with_parent(parent)
    os.setsid()
    if request.get("pty"):
        fcntl.ioctl(0, _TIOCSCTTY, 0)
    drop_privileges()
    _enter_workdir(request["cwd"])
    load_seccomp(request)


#: detached copies of the mount sources (`_pin_sources`): (descriptor, path under `STAGE`)
_PINNED: list = []
#: whether this process made and entered a user namespace of its own (`_enter_userns`)
_IN_USERNS = False
#: pinned copies of the host's directories under a build's writable overlay: idmapped
#: (`_idmap_pinned`) so that the host's root is root inside there
_IDMAPPED: list = []


def _pin(path):
    """A detached copy of the mounts at ``path`` (``open_tree``), attached at a path
    under `STAGE` by `_attach_pinned`; that path is returned (``path`` itself if it
    cannot be opened: mounting it then fails with the usual message)."""
    number = _syscall_no("open_tree")
    if number is None:
        return path
    fd = _libc.syscall(
        number, _AT_FDCWD, _b(path), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE
    )
    if fd < 0:
        return path
    staged = f"{STAGE}/{len(_PINNED)}"
    _PINNED.append((fd, staged))
    return staged


def _split_escaped(text, sep):
    """Split overlayfs's option text at unescaped ``sep``; escapes are kept."""
    parts, current, escaped = [], "", False
    for ch in text:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            current += ch
            escaped = True
        elif ch == sep:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _unescape(path):
    out, escaped = "", False
    for ch in path:
        if ch == "\\" and not escaped:
            escaped = True
            continue
        out += ch
        escaped = False
    return out


def _escape(path):
    for ch in "\\:,":
        path = path.replace(ch, "\\" + ch)
    return path


def _pin_overlay(options):
    """An overlay's options with each directory pinned (`_pin`); the upper and work
    directories through their common parent (overlayfs wants them on one mount)."""
    fields = {}
    for option in _split_escaped(options, ","):
        key, _, value = option.partition("=")
        fields[key] = value
    if "lowerdir" in fields:
        lowers = [_pin(_unescape(d)) for d in _split_escaped(fields["lowerdir"], ":")]
        fields["lowerdir"] = ":".join(_escape(d) for d in lowers)
        if "upperdir" in fields and _PINNED and lowers[-1] == _PINNED[-1][1]:
            _IDMAPPED.append(_PINNED[-1][0])  # the host's directory a build writes over
    if "upperdir" in fields and "workdir" in fields:
        upper, work = _unescape(fields["upperdir"]), _unescape(fields["workdir"])
        parent = os.path.commonpath([upper, work])
        staged = _pin(parent)
        fields["upperdir"] = _escape(staged + upper[len(parent) :])
        fields["workdir"] = _escape(staged + work[len(parent) :])
    return ",".join(f"{k}={v}" for k, v in fields.items())


def _pin_sources(spec):
    """Take hold of every mount source while this process is still host root.

    Root inside a user namespace is not host root: it may not walk a host root's
    0700 directories (``/root``, the server's state directory) to reach a
    sandbox's root, a volume or a layer. Detached copies of those mounts taken
    now (``open_tree``) are attached in the container's own mount namespace
    (`_attach_pinned`) without a walk; the spec names them there."""
    spec["root_source"] = _pin(spec["root"])
    mounts = []
    for kind, source, path in spec["mounts"]:
        if kind in ("ro", "rw"):
            source = _pin(source)
        elif kind == "overlay":
            source = _pin_overlay("lowerdir=" + source)[len("lowerdir=") :]
        elif kind == "overlay_rw":
            source = _pin_overlay(source)
        mounts.append((kind, source, path))
    spec["mounts"] = mounts


def _attach_pinned():
    """In the container's mount namespace: a tmpfs at `STAGE`, the pinned copies on it."""
    mount("tmpfs", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k,mode=755")
    number = _syscall_no("move_mount")
    for fd, staged in _PINNED:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.mkdir(staged)
        else:  # a single file (a local file of the image): a file to mount it on
            os.close(os.open(staged, os.O_CREAT | os.O_WRONLY, 0o644))
        _check(
            _libc.syscall(number, fd, b"", _AT_FDCWD, _b(staged), _MOVE_MOUNT_F_EMPTY_PATH),
            f"attaching {staged}",
        )
    close_pinned()


def close_pinned():
    """Close the descriptors `_pin_sources` opened."""
    while _PINNED:
        os.close(_PINNED.pop()[0])


def _write_file(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _write_id_maps(pid, userns):
    """From outside (this machine's user namespace): ``pid``'s uid and gid maps.

    With ``helpers`` (a normal user's subordinate range) the setuid
    ``newuidmap``/``newgidmap`` write them; else this process does (as root any
    map; as a normal user only its own id, after ``setgroups`` is denied, the
    kernel's rule for an unprivileged map)."""
    helpers = userns.get("helpers")
    if helpers:
        for exe, lines in zip(helpers, (userns["uid_map"], userns["gid_map"]), strict=True):
            argv = [exe, str(pid), *(str(n) for line in lines for n in line)]
            child = os.posix_spawn(exe, argv, {"PATH": "/usr/bin:/bin"})
            _, status = os.waitpid(child, 0)
            if status != 0:
                raise ContainerError(f"{os.path.basename(exe)} failed (status {status})")
        return
    if not userns.get("setgroups", True):
        _write_file(f"/proc/{pid}/setgroups", "deny")
    for kind in ("uid", "gid"):
        lines = "".join(f"{a} {b} {n}\n" for a, b, n in userns[kind + "_map"])
        _write_file(f"/proc/{pid}/{kind}_map", lines)


def _become_root_inside():
    """Root of the user namespace just entered: no groups of the host (where the map
    allows ``setgroups``), uid and gid 0 inside (``userns.IdMap``: never root outside)."""
    parent = os.getppid()
    try:
        os.setgroups([])
    except PermissionError:
        pass  # a single-id map: setgroups is denied (the groups held are the user's own)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    # a change of ids clears the parent-death signal: set it again (and mind a parent
    # that died meanwhile)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(137)


def _idmap_pinned(pid):
    """Make the pinned host directories under a build's writable overlay idmapped
    mounts with ``pid``'s user namespace (``mount_setattr(MOUNT_ATTR_IDMAP)``, Linux 5.12;
    as host root, on the still detached copies): the host's root-owned files there are
    root's inside, so dpkg may replace them (it hard-links the old file first, which
    needs to own it). Where the filesystem cannot be idmapped, nothing changes (dpkg then
    cannot replace a file of this machine's own packages, and says so)."""
    if not _IDMAPPED:
        return
    number = _syscall_no("mount_setattr")
    userns_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    attr = struct.pack("QQQQ", _MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    buf = ctypes.create_string_buffer(attr, len(attr))
    for fd in _IDMAPPED:
        _libc.syscall(number, fd, b"", _AT_EMPTY_PATH | _AT_RECURSIVE, buf, len(attr))
    os.close(userns_fd)


def _own_session_keyring():
    """A new, empty session keyring: the server's (inherited through fork) holds what
    its own session holds. ``KEYCTL_JOIN_SESSION_KEYRING`` with no name; a kernel
    without keys support just says no."""
    number = _syscall_no("keyctl")
    if number is not None:
        _libc.syscall(number, 1, None)


def _enter_userns(userns):
    """The handshake that puts this process in a new user namespace with the given maps.

    A map is written from the parent namespace, so a forked helper (still
    outside) waits until this process has unshared, writes its maps, and exits;
    its exit status is the answer. Then this process becomes root inside."""
    me = os.getpid()
    go_r, go_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(go_w)
        code = 1
        try:
            if os.read(go_r, 1) == b"1":
                if userns.get("helpers"):
                    os.closerange(3, 256)  # nothing of the sandbox's goes to newuidmap
                _write_id_maps(me, userns)
                _idmap_pinned(me)
                code = 0
        except BaseException as exc:
            os.write(2, f"[prefect-modal local] cannot map the sandbox's ids: {exc}\n".encode())
        os._exit(code)
    os.close(go_r)
    try:
        _check(_libc.unshare(CLONE_NEWUSER), "unshare (user namespace)")
        os.write(go_w, b"1")
    finally:
        os.close(go_w)
        _, status = os.waitpid(helper, 0)
    if status != 0:
        raise ContainerError("the user namespace's id maps could not be written")
    _become_root_inside()
    _own_session_keyring()
    global _IN_USERNS
    _IN_USERNS = True


def _other_ns(pid, name):
    """Whether ``pid``'s namespace ``name`` is another than this process's."""
    mine, theirs = os.stat(f"/proc/self/ns/{name}"), os.stat(f"/proc/{pid}/ns/{name}")
    return (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino)


def start(request, info_fd):
    """In the fork server's child: become a new sandbox's entrypoint (returns there only).

    ``info_fd`` gets ``init <pid>`` (the monitor's host pid, through which ``exec``
    and the file API reach the container: written by the monitor, before anything of
    the sandbox runs) and ``ready`` once the root is built (by the init, before
    the program exists); both close it then, so no process of the sandbox holds
    it. The sandbox's end reaches the server as the monitor's exit status.
    """
    spec = request["isolate"]
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    netns_fd = spec.get("netns_fd")
    if netns_fd is not None:  # made ahead by the server, pasta attached (`netns_pool`)
        _check(_libc.setns(netns_fd, CLONE_NEWNET), "setns")
        os.close(netns_fd)
    elif spec["network"] != "host":
        flags |= CLONE_NEWNET
    if spec.get("userns") is not None:
        if os.geteuid() == 0:
            _pin_sources(spec)
        _enter_userns(spec["userns"])  # first: the namespaces below are then owned by it
    _check(_libc.unshare(flags), "unshare")
    status_r, status_w = os.pipe()
    monitor = os.getpid()
    init = os.fork()
    if init:
        os.close(status_w)
        # the pid the server reaches the container through: this monitor's, not the init's.
        # It shares every namespace of the init's (its root too, after pivot_root) but the
        # PID one, whose pid_for_children it has; no process of the sandbox can name it; and
        # it stays dumpable, so a server that is not root may open its /proc entries, which
        # the init's (not dumpable, `_not_dumpable`) refuse to all but root
        _write(info_fd, f"init {monitor}\n")
        os.close(info_fd)
        if spec.get("root_source"):
            close_pinned()
        _monitor(init, status_r)
    os.close(status_r)
    _die_with_parent(monitor, outside=True)
    try:
        build_root(spec)
        _check(_libc.sethostname(_b(spec["hostname"]), len(spec["hostname"])), "sethostname")
        if spec["network"] != "host":
            _loopback_up()
    except (OSError, ContainerError) as exc:
        os.write(2, f"[prefect-modal local] cannot make the sandbox's container: {exc}\n".encode())
        _write(status_w, str(126 << 8))  # a wait status: exited 126, as a shell says "cannot run"
        os._exit(126)
    _write(info_fd, "ready\n")
    os.close(info_fd)  # the server's channel: nothing of the sandbox's code may hold it
    go_fd = spec.get("go_fd")
    if go_fd is not None:  # the server attaches the network first (pasta)
        os.read(go_fd, 1)
        os.close(go_fd)
    init_pid = os.getpid()
    # from here on the sandbox's own code runs: the init's memory and fds are closed to it
    # (not before: a rootless server may still have to write this process's uid_map)
    _not_dumpable()
    program = os.fork()
    if program == 0:
        os.close(status_w)
        _become_program(request, init_pid)
        return
    _quiet_stdio()
    drop_privileges()
    _not_dumpable()  # again: a change of credentials may have reset it
    load_seccomp(request)
    _init(program, status_w)


def join(request):
    """In the fork server's child: become a process of a running sandbox (``exec``)."""
    init = request["join"]
    fds = []
    try:
        # the user namespace first (the others are its own); none this process is in already
        # (a sandbox on the host's network shares its namespace: not the sandbox's to enter).
        # As root, the network before it: a namespace made ahead (`netns_pool`) belongs to
        # the host's user namespace, and root inside a sandbox's holds no capability there
        order = ("user", "ipc", "uts", "net", "pid_for_children", "mnt")
        if os.geteuid() == 0:
            order = ("net", "user", "ipc", "uts", "pid_for_children", "mnt")
        names = [n for n in order if _other_ns(init, n)]
        for name in names:
            fds.append(os.open(f"/proc/{init}/ns/{name}", os.O_RDONLY))
    except OSError:
        os.write(2, b"[prefect-modal local] the sandbox has finished\n")
        os._exit(126)
    for fd in fds:
        _check(_libc.setns(fd, 0), "setns")
        os.close(fd)
    if "user" in names:
        _become_root_inside()
        _own_session_keyring()
    pid = os.fork()
    if pid:
        _quiet_stdio()
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        _end_like(status)
    os.chdir("/")
    _become_program(request, None)


def self_test():
    """True if this process can make containers (namespaces, mounts); run in a child.

    As a normal user that needs a user namespace, so a normal user's answer is
    `userns_test`'s."""
    if os.geteuid() != 0:
        return userns_test()
    pid = os.fork()
    if pid == 0:
        try:
            _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET), "unshare")
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            mount("tmpfs", "/tmp", "tmpfs", 0, "size=4k")
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return status == 0


def userns_test():
    """True if this process can make a container in a user namespace of its own: the
    id-map handshake (with a map of this process's own ids: a test only), then in it
    a mount and PID namespace, a tmpfs, and a ``/proc`` of that PID namespace
    (refused where the host's ``/proc`` is partly hidden, as in some containers)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.closerange(3, 256)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            ids = {"uid_map": [[0, os.geteuid(), 1]], "gid_map": [[0, os.getegid(), 1]]}
            _enter_userns({**ids, "helpers": None, "setgroups": False})
            _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET), "unshare")
            inner = os.fork()
            if inner == 0:
                try:
                    mount(None, "/", None, MS_REC | MS_PRIVATE)
                    mount("tmpfs", "/tmp", "tmpfs", 0, "size=4k")
                    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            _, status = os.waitpid(inner, 0)
            os._exit(0 if status == 0 else 1)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return status == 0


def exec_program(argv, env):
    """execve ``argv[0]`` found on the sandbox's PATH; a failure ends as a shell would (127/126)."""
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        code = 127 if exc.errno == errno.ENOENT else 126
        os.write(2, f"[prefect-modal local] cannot start {argv[0]!r}: {exc.strerror}\n".encode())
        os._exit(code)
