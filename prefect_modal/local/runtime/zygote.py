"""The fork server's own program: a warm Python that forks into sandbox processes.

Not imported by the server: `forkserver` runs ``python [-S] -c`` with a launcher
that reads this file and runs it, so it runs in exactly the interpreter, flags
and locale a sandbox's ``python [-S] -c <code>`` would get.  Standard library
only.  The fork server's launcher zygote runs it the same way, as ``python -I
-S``, and only forks and execs: its children make containers (`container`).

Life of the zygote:

1. It imports the modules it is told to preload (``argv[2]``, JSON: module
   names and the directories to find them in; the directories are taken off
   ``sys.path`` again, so a ``-S`` program still has the path it would have).
2. It says ``ready`` on fd 0, a SOCK_SEQPACKET socket to the server, and
   serves requests there: one JSON message plus the fds of the new
   process's stdin, stdout and stderr (SCM_RIGHTS), for a new container its
   info and go pipes (see `container`), and last the *payload*: a memfd that
   holds the command and its environment.
3. For each request it forks.  The parent answers ``{"id", "pid"}``; the child
   reads the payload, makes or joins a container when asked (`container`) and
   becomes the program: its own session, ``PR_SET_PDEATHSIG`` (it dies with
   the zygote, which dies with the server), the given fds on 0-2 and nothing
   else open, the cwd and environment of the request, then either an ``exec``
   of the program or, for ``python -c``, a pristine ``__main__``, ``sys.argv``
   as ``python -c`` sets it, and the code.

   Why the payload is a file only the child reads: every process this zygote
   forks starts as a copy of its memory, and sandboxes are not to read each
   other's secrets. The zygote itself never reads a command, code or
   environment, so nothing of one sandbox is in the memory that the next
   one's processes are copied from. The child is not dumpable
   (``PR_SET_DUMPABLE`` 0, so its ``/proc/<pid>/mem``, ``fd`` and ``environ``
   are closed to the sandbox's processes) until it becomes the program; a
   new container's init and monitor make themselves so before anything of
   the sandbox runs, and stay so (`container`).
4. On SIGCHLD it kills what is left of the exited child's process group
   (while the unreaped child still holds the group id) and reaps it, and
   sends ``{"exit": pid, "code": n}`` (``-N`` for signal N, as Popen does).

It exits when the server closes the socket.  What differs from a fresh
interpreter: the preloaded modules are already in ``sys.modules``, and every
child shares the zygote's str hash seed (``random`` reseeds itself at fork).
"""

import json
import os
import resource  # used after the container is made, when this stdlib may be out of view
import select
import signal
import socket
import sys

FILENAME = "<prefect-modal-zygote>"
CONTAINER_FILENAME = "<prefect-modal-container>"
MAX_REQUEST = 1 << 20
# stdin, stdout, stderr, the container's info pipe, its go pipe, its netns, the payload
MAX_FDS = 7
PR_SET_DUMPABLE = 4


def _preload(spec):
    added = [d for d in spec.get("paths", []) if d not in sys.path]
    sys.path.extend(added)
    for name in spec.get("modules", []):
        try:
            __import__(name)
        except Exception:  # a module that is not there is simply not warm
            pass
    for d in added:
        sys.path.remove(d)
    # Objects that exist now are never collected in a child: a collection would
    # touch (and so copy) every page the child shares with the zygote.
    import gc

    gc.collect()
    gc.freeze()


def _send(sock, message):
    try:
        sock.send(json.dumps(message).encode())
    except OSError:
        os._exit(0)  # the server is gone


def _read_payload(fd):
    """The command and environment the server put in the payload memfd (then closed)."""
    chunks = []
    offset = 0
    try:
        while True:
            chunk = os.pread(fd, 1 << 16, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return json.loads(b"".join(chunks))


def _reap(sock):
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or not info.si_pid:
            return
        pid = info.si_pid
        try:
            os.killpg(pid, signal.SIGKILL)  # the container goes with its entrypoint
        except OSError:
            pass
        _, status = os.waitpid(pid, 0)
        _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _child(request, fds, main_attrs, libc, container):
    """In the forked child: become the requested program; returns what to run.

    For an isolated sandbox (``isolate``) or an ``exec`` in one (``join``),
    `container` makes this process a container's entrypoint (or a process in
    a running one) first; it returns only in that final process.
    """
    zygote = os.getppid()
    try:
        if request.get("isolate") is None:  # a new container's init decides (`container`)
            libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # before it holds anything of the sandbox's
        request.update(_read_payload(fds.pop()))
        os.setsid()
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != zygote:
            os._exit(137)
        container.join_cgroups(request.get("cgroup") or ())  # first: all it starts is inside
        high = [os.dup(fd) for fd in fds]  # out of the way of the numbers they go to
        for target, fd in enumerate(high):
            os.dup2(fd, target)
        os.closerange(len(fds), os.sysconf("SC_OPEN_MAX"))
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if request.get("join") is not None:
            container.join(request)
        elif request.get("isolate") is not None:
            container.start(request, 3)
        else:
            os.chdir(request["cwd"])
        if request.get("rlimit_as"):
            limit = request["rlimit_as"]
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.environ.clear()
        os.environ.update(request["env"])
    except BaseException as exc:
        try:
            os.write(2, f"[prefect-modal local] cannot start the process: {exc}\n".encode())
        finally:
            os._exit(126)
    argv = request["argv"]
    # the program's own memory from here on (an exec resets this too), as in any container
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    if request.get("code_index") is None:  # a program, not python -c: exec it
        container.exec_program(argv, request["env"])
    sys.argv = ["-c", *argv[request["code_index"] + 1 :]]
    sys.orig_argv = list(argv)
    main = sys.modules["__main__"].__dict__
    main.clear()
    main.update(main_attrs)
    return argv[request["code_index"]]


def serve(main_attrs, container):
    """The zygote's loop; returns only in a forked child, with the code it must run."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    sock = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    isolation = container.self_test()
    userns = isolation if os.geteuid() != 0 else container.userns_test()
    _send(sock, {"ready": os.getpid(), "isolation": isolation, "userns": userns})
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap(sock)
        if sock.fileno() not in ready:
            continue
        try:
            message, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
        except OSError:
            os._exit(0)
        if not message:
            os._exit(0)  # the server closed its end
        request = json.loads(message)
        if not fds:
            _send(sock, {"id": request["id"], "error": "no payload"})
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            _send(sock, {"id": request["id"], "error": str(exc)})
            continue
        if pid == 0:
            sock.detach()  # its fd is closed below; the object must not close a reused number
            return _child(request, fds, main_attrs, libc, container)
        for fd in fds:
            os.close(fd)
        _send(sock, {"id": request["id"], "pid": pid})


def run(code):
    """Run the child's code as ``python -c`` would: tracebacks without our frames,
    exit status 1 for an uncaught exception, 130 for KeyboardInterrupt."""
    main = sys.modules["__main__"].__dict__
    try:
        if isinstance(code, str):
            code = compile(code, "<string>", "exec")
        exec(code, main)
    except SystemExit:
        raise
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (FILENAME, CONTAINER_FILENAME):
            tb = tb.tb_next
        # the hook prints the exception's own traceback: give it the trimmed one
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 1) from None


def main():
    main_attrs = dict(sys.modules["__main__"].__dict__)
    for name in list(main_attrs):
        if not name.startswith("__"):
            del main_attrs[name]  # the launcher's own names (``sys``)
    # argv: -c, this file's path, the preload spec, the path of `container`
    _preload(json.loads(sys.argv[2]))
    import types

    container = types.ModuleType("_prefect_modal_container")
    with open(sys.argv[3], encoding="utf-8") as f:
        exec(compile(f.read(), CONTAINER_FILENAME, "exec"), container.__dict__)
    run(serve(main_attrs, container))


if __name__ == "_prefect_modal_zygote":  # how `forkserver` runs it; importing runs nothing
    main()
