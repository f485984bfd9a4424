"""The seccomp filter of an isolated sandbox: Docker's default profile, made by libseccomp.

Why: a sandbox's root has a container's capabilities, but the kernel still
offers it calls that reach the whole machine through paths capabilities do not
guard: the keyrings (``keyctl``, ``add_key``, ``request_key``: root's keyring is
shared with the host without a user namespace), new user namespaces (in which
the program is "root" again and may make cgroups or mount), ``bpf``,
``setns``... A container runtime closes them with Docker's default seccomp
profile (moby/moby ``profiles/seccomp/default.json``); so does this module.

The profile here is that file's refusals written as data (`REFUSED`,
`REFUSED_CLONE_FLAGS`, `ENOSYS_CALLS`) for a container that, like ours, holds
none of ``CAP_SYS_ADMIN``, ``CAP_SYS_MODULE``, ``CAP_SYS_PTRACE``,
``CAP_SYS_BOOT``, ``CAP_SYS_TIME``, ``CAP_SYS_NICE``... (`container.KEPT_CAPS`):
every call that Docker allows only with one of those, and every call it leaves
out of its allow list, answers ``EPERM`` (Docker's ``defaultErrnoRet`` 1);
``clone3`` answers ``ENOSYS`` as in Docker, so that libc falls back to
``clone``, whose namespace flags are refused (Docker's masked ``clone`` rule).
Docker's profile is an allow list; this one refuses the same calls from a
default of "allow", so that a call that is new to this kernel and unknown to
libseccomp keeps working (Docker would refuse it), and ``personality`` is not
narrowed to Docker's five values (it changes only the calling process).
``ptrace`` and ``process_vm_readv`` stay allowed, as in Docker on kernels from
4.8 on: the kernel's own ptrace checks decide, and the processes a sandbox
must not reach (its init and monitor) are not dumpable (`container`).

The filter is generated once per server with libseccomp's Python binding:
Debian's ``python3-seccomp`` (module ``seccomp``) when it is importable, else
the PyPI package ``pyseccomp`` (a ctypes binding with the same API), both on
top of ``libseccomp.so.2``. The BPF program travels in each container request
(`forkserver`) and is loaded by the sandbox's processes themselves, after
``no_new_privs``, just before the program runs (`container`). Where neither the
binding nor the library is there, the server says so at start and in each
sandbox's log (`NOTICE`), and sandboxes run without the filter.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import platform
import tempfile
from types import ModuleType
from typing import Any

log = logging.getLogger("prefect_modal.local")

#: Calls an unprivileged Docker container may not make (default.json: not in its
#: allow list, or allowed only with a capability our sandboxes do not hold).
REFUSED = (
    # keyrings: not in Docker's allow list at all
    "keyctl",
    "add_key",
    "request_key",
    # CAP_SYS_ADMIN's group in default.json
    "bpf",
    "fanotify_init",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "perf_event_open",
    "quotactl",
    "quotactl_fd",
    "setdomainname",
    "sethostname",
    "setns",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    # CAP_SYS_BOOT, CAP_SYS_MODULE, CAP_SYS_PACCT, CAP_SYS_RAWIO, CAP_SYS_TIME,
    # CAP_SYS_TTY_CONFIG, CAP_SYS_NICE, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE's extras
    "reboot",
    "delete_module",
    "init_module",
    "finit_module",
    "acct",
    "iopl",
    "ioperm",
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "vhangup",
    "get_mempolicy",
    "mbind",
    "set_mempolicy",
    "set_mempolicy_home_node",
    "move_pages",
    "migrate_pages",
    "open_by_handle_at",
    "kcmp",
    "pidfd_getfd",
    "process_madvise",
    # left out of Docker's allow list: old, obsolete or whole-machine calls
    "kexec_load",
    "kexec_file_load",
    "pivot_root",
    "swapon",
    "swapoff",
    "userfaultfd",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "nfsservctl",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "vm86",
    "vm86old",
)

#: ``clone`` with any of these flags is refused (default.json's masked rule,
#: 2114060288 = 0x7E020000): new mount, cgroup, UTS, IPC, user, PID or network
#: namespaces.
REFUSED_CLONE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)

#: Calls that answer ENOSYS (default.json: ``clone3``, errnoRet 38), so that libc
#: falls back to ``clone``, whose flags the filter can read.
ENOSYS_CALLS = ("clone3",)

#: ``socket`` of this address family is refused (default.json: AF_VSOCK, 40).
REFUSED_SOCKET_FAMILIES = (40,)

#: ``=0`` runs sandboxes without the filter (announced like a missing libseccomp)
ENV_SWITCH = "PREFECT_MODAL_LOCAL_SECCOMP"

INSTALL_HINT = (
    "apt-get install libseccomp2 python3-seccomp, or pip install pyseccomp "
    "(with libseccomp2 installed)"
)

NOTICE = (
    "[prefect-modal local] this sandbox runs WITHOUT a seccomp filter ({why}): calls that "
    "Docker's default profile refuses (keyctl, bpf, mount, unshare, setns...) are guarded "
    "only by the sandbox's capabilities. To add it: " + INSTALL_HINT + ".\n"
)


def _binding() -> ModuleType:
    """libseccomp's binding: Debian's ``seccomp`` first, then PyPI's ``pyseccomp``."""
    try:
        import seccomp  # type: ignore[import-not-found]

        return seccomp  # type: ignore[no-any-return]
    except ImportError:
        pass
    import pyseccomp  # type: ignore[import-untyped]  # raises OSError without libseccomp.so

    return pyseccomp  # type: ignore[no-any-return]


#: Docker's ``archMap``: the 32-bit ABIs a 64-bit machine also runs, filtered alike
#: (a call through an ABI the filter does not list kills the process: libseccomp's
#: default for a "bad architecture").
SUB_ARCHITECTURES = {"x86_64": ("X86", "X32"), "aarch64": ("ARM",)}


def _add_arches(lib: Any, flt: Any) -> None:
    for name in SUB_ARCHITECTURES.get(platform.machine(), ()):
        try:
            flt.add_arch(getattr(lib.Arch, name))
        except (AttributeError, OSError, RuntimeError, ValueError):
            pass  # a kernel or libseccomp without it: those binaries are killed, not let through


def _add_denials(lib: Any, flt: Any) -> None:
    eperm = lib.ERRNO(errno.EPERM)
    seen: set[str] = set()
    for name in REFUSED:
        if name in seen:
            continue
        seen.add(name)
        try:
            flt.add_rule(eperm, name)
        except (OSError, RuntimeError, ValueError):
            pass  # a call this architecture (or libseccomp) does not know
    for name in ENOSYS_CALLS:
        try:
            flt.add_rule(lib.ERRNO(errno.ENOSYS), name)
        except (OSError, RuntimeError, ValueError):
            pass
    for flag in REFUSED_CLONE_FLAGS:
        flt.add_rule(eperm, "clone", lib.Arg(0, lib.MASKED_EQ, flag, flag))
    for family in REFUSED_SOCKET_FAMILIES:
        flt.add_rule(eperm, "socket", lib.Arg(0, lib.EQ, family))


def build() -> bytes:
    """The filter as a BPF program (``struct sock_filter`` array) for this machine.

    Raises ImportError or OSError when libseccomp or its binding is missing.
    """
    lib = _binding()
    flt = lib.SyscallFilter(lib.ALLOW)
    _add_arches(lib, flt)
    _add_denials(lib, flt)
    with tempfile.TemporaryFile() as f:
        flt.export_bpf(f)
        f.flush()
        f.seek(0)
        return f.read()


@functools.lru_cache(maxsize=1)
def _cached() -> tuple[bytes | None, str | None]:
    try:
        return build(), None
    except ImportError:
        return None, "no libseccomp binding: neither python3-seccomp nor pyseccomp is installed"
    except (OSError, AttributeError, RuntimeError, ValueError) as exc:
        return None, f"libseccomp cannot be used: {exc}"


def _turned_off() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


def program() -> bytes | None:
    """The BPF program for this server's sandboxes, made once; None if it cannot be."""
    return None if _turned_off() else _cached()[0]


def why_unavailable() -> str | None:
    """None if sandboxes get the filter, else why not in a few words."""
    if _turned_off():
        return f"turned off with {ENV_SWITCH}=0"
    return _cached()[1]


def announce() -> None:
    """Say once, at the server's start, that sandboxes run without the filter (if so)."""
    why = why_unavailable()
    if why is not None:
        log.warning(NOTICE.format(why=why).removeprefix("[prefect-modal local] ").strip())


__all__ = [
    "ENOSYS_CALLS",
    "ENV_SWITCH",
    "INSTALL_HINT",
    "NOTICE",
    "REFUSED",
    "REFUSED_CLONE_FLAGS",
    "announce",
    "build",
    "program",
    "why_unavailable",
]
