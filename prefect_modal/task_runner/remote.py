"""What runs inside a per-step sandbox: read a pickled call, run it, send back the outcome.

This file is sent to the sandbox as the *source* of ``python -S -c`` (see
``call.bootstrap_command``), because prefect_modal is not in the user's
image.  So it imports nothing but the standard library (cloudpickle only when a
payload needs it, as unpickling by-value code does), and never imports
Prefect: the sandbox needs no route to the Prefect API and the per-task cost
stays one process start.  ``-S`` skips `.pth` processing; `_fast_site` does the
cheap part of `site` and `_LateSite` the rest on the first import that misses.

The protocol (one call per process):

* stdin: one header line of ``key=value`` words (protocol, nonce, expected
  Python ``X.Y``, payload size, result size limit, log level, the top-level
  modules the call needs, whether it carries a run context), then exactly
  ``size`` bytes of ``cloudpickle.dumps((fn, args, kwargs))``, or of
  ``(fn, args, kwargs, context)`` for a call whose code uses Prefect: then
  the context holds the source of ``remote_context.py``, which rebuilds the
  task run's Prefect context around the call (the only case where the
  sandbox imports Prefect).
* the private channel: fd 1 as the sandbox started, duplicated before any user
  code runs; fd 1 is then pointed at a pipe whose lines the bootstrap re-emits
  on stderr with a marker (fd 2 likewise, unmarked, each line made valid
  UTF-8).  User prints, subprocesses and C extensions can therefore never
  write into the channel, nor end Modal's strict UTF-8 reader of stderr.  On it go frames
  ``<nonce> <KIND> <n>\\n<n base64 chars>\\n<nonce> END\\n``: ``HELLO`` first (our
  Python version, before any user code; the version check happens here), then
  one of ``OK`` (pickled result), ``REF`` (the result was over the limit and
  went to the mounted result volume: ``name= size= sha256=``), ``RAISE``
  (pickled exception info with the remote traceback) or ``ERROR``
  (``reason\\nmessage``: the bootstrap could not do its job: Python version
  mismatch, unloadable payload, result too large).
* stderr: every line is the user's output.  Lines that start with ``MARK`` carry
  their origin: ``\\x1fO\\x1f`` stdout (INFO), ``\\x1fL<levelno>\\x1f`` a ``logging``
  record at that level, ``\\x1fR<levelno>\\x1f`` a record of Prefect's run logger
  as one line of JSON (name, message, extra fields), ``\\x1fB\\x1f`` a bootstrap
  notice.  Unmarked lines are raw stderr (WARNING on the Prefect side).

Warm mode (a sandbox that serves many calls of one flow run, `warm.py`): the
first stdin line is ``prefect-modal-loop nonce=<session>``; after it,
everything on stdin is a frame of the session nonce: ``CALL`` (a header line
as above, then the payload), ``REPLY`` (an answer to the running call's nested
submit, handed to that call's reply pipe, so replies never mix with the next
call's payload) or ``PING`` (keeps the sandbox from its idle timeout).  Each
call's outcome is one frame of the session nonce on the channel, after a
``\x1fE\x1f<call nonce>`` line on stderr that follows the call's last output
line.  A new pipe takes fd 1 for each call.  stdin's end ends the loop (exit 0).

The same file is imported by the runner for the frame and line helpers below,
so both ends of the protocol live in one place.
"""

import binascii
import os
import sys
import threading

PROTOCOL = 1
MARK = "\x1f"
STDOUT_TAG = MARK + "O" + MARK
BOOTSTRAP_TAG = MARK + "B" + MARK
#: Warm mode: the line after a call's last output line on stderr, with the call's nonce.
END_TAG = MARK + "E" + MARK
#: Warm mode: the first stdin line (``prefect-modal-loop nonce=<session>``).
LOOP_GREETING = b"prefect-modal-loop "
EXIT_BOOTSTRAP_FAILED = 3

_write_lock = threading.Lock()


# -- helpers shared with the runner (pure functions, no I/O) ---------------------


def encode_frame(nonce, kind, data):
    """One frame for the private channel; `data` is bytes."""
    text = binascii.b2a_base64(data, newline=False).decode("ascii")
    return f"\n{nonce} {kind} {len(text)}\n{text}\n{nonce} END\n"


def decode_frames(nonce, text):
    """All frames carrying `nonce` in `text`, as a list of (kind, bytes), in order.

    Anything else on the channel is ignored; a frame cut short (the sandbox was
    killed while writing) is dropped rather than half-read.
    """
    frames = []
    prefix = nonce + " "
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(prefix):
            parts = line.split(" ")
            if len(parts) == 3 and parts[2].isdigit() and i + 2 < len(lines):
                body, end = lines[i + 1], lines[i + 2]
                if end == nonce + " END" and len(body) == int(parts[2]):
                    frames.append((parts[1], binascii.a2b_base64(body)))
                    i += 3
                    continue
        i += 1
    return frames


class FrameReader:
    """Frames carrying `nonce` from a stream read piece by piece (`feed` returns the
    frames completed so far): how each end reads the other while the call runs."""

    def __init__(self, nonce):
        self.nonce = nonce
        self._pending = ""
        self._header = None
        self._body = None

    def feed(self, text):
        frames = []
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            if self._header is None:
                parts = line.split(" ")
                if len(parts) == 3 and parts[0] == self.nonce and parts[2].isdigit():
                    self._header = parts
            elif self._body is None:
                self._body = line
            else:
                kind, size = self._header[1], int(self._header[2])
                if line == self.nonce + " END" and len(self._body) == size:
                    frames.append((kind, binascii.a2b_base64(self._body)))
                self._header = self._body = None
        return frames


def hello_nonce(text):
    """The nonce of the first HELLO frame in `text`: how a process that attaches to a
    sandbox started by an earlier one reads that call's outcome."""
    for line in text.split("\n"):
        parts = line.split(" ")
        if len(parts) == 3 and parts[1] == "HELLO" and parts[2].isdigit():
            return parts[0]
    return None


def classify_line(line):
    """Split one stderr line into (origin, levelno, text): origin is
    "stdout", "log", "bootstrap" or "stderr"."""
    if line.startswith(MARK):
        end = line.find(MARK, 1)
        if end > 1:
            tag, text = line[1:end], line[end + 1 :]
            if tag == "O":
                return "stdout", 20, text
            if tag == "B":
                return "bootstrap", 10, text
            if tag == "E":
                return "end", 10, text
            if tag[:1] == "L" and tag[1:].isdigit():
                return "log", int(tag[1:]), text
            if tag[:1] == "R" and tag[1:].isdigit():
                return "record", int(tag[1:]), text
    return "stderr", 30, line


def make_header(
    nonce,
    size,
    python,
    max_result_bytes,
    log_level=20,
    needs=(),
    context=False,
    ref_dir="",
    arg_ref="",
):
    """The first stdin line: ``key=value`` words (no JSON: the bootstrap avoids `json`'s
    import cost, which is a measurable share of a trivial task).  `ref_dir` (hex of a
    folder on a mounted volume) is where a result over the limit goes by reference;
    `arg_ref` (hex of a file there) holds the payload when it was too large for stdin."""
    fields = {
        "protocol": PROTOCOL,
        "nonce": nonce,
        "size": int(size),
        "python": python,
        "max_result_bytes": int(max_result_bytes),
        "log_level": int(log_level),
        "needs": ",".join(needs),
        "context": 1 if context else 0,
    }
    if ref_dir:
        fields["ref_dir"] = ref_dir
    if arg_ref:
        fields["arg_ref"] = arg_ref
    return (
        "prefect-modal " + " ".join("{}={}".format(*kv) for kv in fields.items()) + "\n"
    ).encode()


def parse_fields(text):
    """``key=value`` words back into a dict of strings (header and HELLO frame)."""
    return dict(word.split("=", 1) for word in text.split() if "=" in word)


def encode_error(reason, message):
    return (reason + "\n" + message).encode("utf-8")


def decode_error(data):
    """(reason, message) of an ERROR frame."""
    reason, _, message = data.decode("utf-8", "replace").partition("\n")
    return reason, message


# -- the sandbox side -----------------------------------------------------------


#: The sandbox's own stderr: fd 2 until the first call, then a private copy, while fd 2
#: is a pipe whose lines `_pump` re-emits (see `_redirect_output`).
_stderr_fd = 2


def _emit_line(tag, text):
    """Write marked lines to stderr in one write each, so lines never interleave mid-way."""
    data = "".join(tag + part + "\n" for part in text.split("\n")).encode("utf-8", "replace")
    with _write_lock:
        try:
            os.write(_stderr_fd, data)
        except OSError:
            pass


def _pump(read_fd, tag):
    """Re-emit everything written to a redirected fd (by anyone), line by line, on stderr:
    fd 1's lines marked as stdout, fd 2's as they are.  Both decoded with replacement
    characters: Modal's readers decode the sandbox's output strictly as UTF-8
    (modal/io_streams.py), so one stray byte would otherwise end the stream."""
    pending = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            if complete:
                _emit_line(tag, b"\n".join(complete).decode("utf-8", "replace"))
    if pending:
        _emit_line(tag, pending.decode("utf-8", "replace"))


_channel_lock = threading.Lock()


def _write_frame(fd, nonce, kind, data):
    """One whole frame on the channel (user threads may send nested submits meanwhile)."""
    payload = encode_frame(nonce, kind, data).encode("ascii")
    view = memoryview(payload)
    with _channel_lock:
        while view:
            written = os.write(fd, view)
            view = view[written:]


def _missing_modules(names):
    """The top-level modules among `names` that this interpreter cannot find."""
    import importlib.util

    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def _prefect_environment():
    """Prefect in a sandbox: no API to send logs to, no ephemeral server to start
    (the user's own env settings win)."""
    import tempfile

    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "false")
    os.environ.setdefault("PREFECT_HOME", os.path.join(tempfile.gettempdir(), "prefect-home"))


def _enter_run_context(context, channel, nonce, send=None, replies=None):
    """Rebuild the task run's Prefect context; None (with a warning line) if it can't be.

    Nested submits go out on the channel as SUBMIT frames; the flow process's
    replies come in on stdin, which is taken from the user's code here (fd 0
    becomes /dev/null, as a sandbox's stdin would be at its end).
    """
    import types

    if replies is None:
        replies = os.dup(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)

    if send is None:

        def send(kind, data):
            _write_frame(channel, nonce, kind, data)

    def emit_record(levelno, body):
        _emit_line(f"{MARK}R{int(levelno)}{MARK}", body.replace("\n", " "))

    try:
        module = types.ModuleType("prefect_modal_remote_context")
        module.__file__ = "<prefect_modal.task_runner.remote_context>"
        sys.modules[module.__name__] = module
        exec(compile(context["source"], module.__file__, "exec"), module.__dict__)
        return module.enter(context, emit_record, send, replies, nonce, sys.modules[__name__])
    except Exception as exc:
        _emit_line(
            f"{MARK}L30{MARK}",
            "prefect-modal: the Prefect run context could not be rebuilt in this sandbox "
            f"({type(exc).__name__}: {exc}); get_run_logger() and prefect.runtime are "
            "unavailable to this call",
        )
        return None


def _install_logging(level):
    """A root handler that marks each record with its level, so INFO stays INFO."""
    import logging

    class MarkedHandler(logging.Handler):
        def emit(self, record):
            try:
                text = self.format(record)
                if record.name and record.name != "root":
                    text = f"[{record.name}] {text}"
                _emit_line(f"{MARK}L{record.levelno}{MARK}", text)
            except Exception:
                self.handleError(record)

    root = logging.getLogger()
    root.addHandler(MarkedHandler())
    root.setLevel(level)


def _dumps(obj):
    """Plain pickle when it can (cloudpickle's import is the largest fixed cost of a
    trivial task), cloudpickle when it is loaded anyway or the object needs it."""
    import pickle

    if "cloudpickle" not in sys.modules:
        try:
            return pickle.dumps(obj, protocol=pickle.DEFAULT_PROTOCOL)
        except Exception:
            pass
    try:
        import cloudpickle
    except ImportError:
        return pickle.dumps(obj, protocol=pickle.DEFAULT_PROTOCOL)
    return cloudpickle.dumps(obj, protocol=pickle.DEFAULT_PROTOCOL)


def _exception_info(exc, tb_text):
    """What the runner needs to rebuild the exception: the object if it pickles
    and loads back, and always its type name, message and traceback text."""
    info = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": tb_text,
        "base": None,
        "exception": None,
    }
    if isinstance(exc, KeyboardInterrupt):
        info["base"] = "KeyboardInterrupt"
    elif isinstance(exc, SystemExit):
        info["base"] = "SystemExit"
        info["message"] = repr(exc.code)
    elif not isinstance(exc, Exception):
        info["base"] = "BaseException"
    else:
        try:
            import pickle

            data = _dumps(exc)
            pickle.loads(data)  # an exception that pickles but cannot load is no use
            info["exception"] = data
        except Exception:
            pass
    return info


def _importing_a_module():
    """True while some module's code is running its import.

    A miss then is almost always a probe (``try: from nt import ...`` in
    `ntpath`, ``org.python.core`` in `pickle`) that expects ImportError; and
    loading ``.pth`` files in the middle of, say, `pathlib`'s own import runs
    their code against a half-initialised module (an editable install's
    finder does ``from pathlib import Path``).
    """
    for module in list(sys.modules.values()):
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


class _LateSite:
    """Run `site` only if an import misses.

    The bootstrap starts with ``python -S``: processing every ``.pth`` file of
    an image costs tens of milliseconds per task, and plain site-packages
    (added by `_fast_site`) is all most calls need.  The first module that no
    finder can locate, outside another module's import (see
    `_importing_a_module`), triggers the full `site.main()` (``.pth`` files,
    sitecustomize), and the search is repeated.  The one thing this misses: a
    package reachable only through a ``.pth`` file and first imported by the
    import of another module; importing it in the task itself first finds it.
    """

    def find_spec(self, name, path=None, target=None):
        if self not in sys.meta_path or _importing_a_module():
            return None
        sys.meta_path.remove(self)
        import site

        site.main()
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if find is not None:
                spec = find(name, path, target)
                if spec is not None:
                    return spec
        return None


def _fast_site():
    """The cheap part of `site`: site-packages (a venv's too) on sys.path, exit()/quit().

    A venv is recognised as `site.venv` does, by ``pyvenv.cfg`` next to the
    interpreter or one level up, without reading any ``.pth`` file.
    """
    if not sys.flags.no_site:
        return
    import site

    prefixes = [sys.prefix]
    exe_dir = os.path.dirname(os.path.abspath(sys.executable))
    for conf in (
        os.path.join(exe_dir, "pyvenv.cfg"),
        os.path.join(os.path.dirname(exe_dir), "pyvenv.cfg"),
    ):
        if os.path.isfile(conf):
            with open(conf, encoding="utf-8") as f:
                text = f.read().replace(" ", "").lower()
            venv = os.path.dirname(conf)
            prefixes = [venv] + (
                [sys.prefix] if "include-system-site-packages=true" in text else []
            )
            sys.prefix = sys.exec_prefix = venv
            break
    for directory in site.getsitepackages(prefixes):
        if os.path.isdir(directory) and directory not in sys.path:
            sys.path.append(directory)
    site.setquit()
    sys.meta_path.append(_LateSite())


def _read_argument(path_hex, size):
    """(payload, "") of a call whose pickle was too large for stdin and went by reference
    to the mounted volume, or (None, why)."""
    path = binascii.unhexlify(path_hex).decode("utf-8")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return None, (
            f"the call's arguments went by reference to {path}, which this sandbox cannot "
            f"read ({exc}); a v1 volume shows a running sandbox only what it held when the "
            "sandbox started: use a v2 volume"
        )
    if len(data) != size:
        return None, f"the call's arguments at {path} are {len(data)} bytes, not {size}"
    return data, ""


def _write_reference(ref_dir_hex, nonce, body):
    """Write a result too large for the channel to the mounted result volume; the
    handle (``name= size= sha256=``) goes back instead.  Written under a temporary
    name and renamed, then synced, so a reader never sees half a file."""
    import hashlib
    import subprocess

    folder = binascii.unhexlify(ref_dir_hex).decode("utf-8")
    os.makedirs(folder, exist_ok=True)
    name = nonce + ".pkl"
    tmp = os.path.join(folder, "." + name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, name))
    try:  # Modal persists a sandbox's volume writes on `sync` of the mount (and at exit)
        subprocess.run(["sync", folder], check=False, capture_output=True, timeout=120)
    except Exception:
        pass
    digest = hashlib.sha256(body).hexdigest()
    return f"name={name} size={len(body)} sha256={digest}".encode("ascii")


def _redirect_output():
    """Point fd 1 and fd 2 at fresh pipes whose lines pumps re-emit on the sandbox's stderr
    (fd 1's marked); returns the pumps for `_drain_output`."""
    global _stderr_fd
    sys.stdout.flush()
    sys.stderr.flush()
    if _stderr_fd == 2:
        _stderr_fd = os.dup(2)  # the real stderr, for our marked lines and the pumps
    pumps = []
    for fd, tag in ((1, STDOUT_TAG), (2, "")):
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, fd)
        os.close(write_fd)
        pump = threading.Thread(target=_pump, args=(read_fd, tag), daemon=True)
        pump.start()
        pumps.append(pump)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # a replaced sys.stdout may lack it
        reconfigure(line_buffering=True)
    return pumps


def _drain_output(pumps):
    """Let the user's last output reach stderr: fd 1 to /dev/null and fd 2 back to the
    real stderr close our ends of the pipes, so the pumps see EOF (unless a child
    process still holds one)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    os.dup2(_stderr_fd, 2)
    for pump in pumps:
        pump.join(timeout=5)


def _load_call(payload):
    """(fn, args, kwargs, context) from the payload, or ("load", message) on failure."""
    try:
        import pickle

        loaded = pickle.loads(payload)
        return (loaded[0], loaded[1], loaded[2], loaded[3] if len(loaded) > 3 else None), None
    except Exception as exc:
        missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
        hint = (
            f"module {missing!r} is not installed in the sandbox image; add it with "
            "SandboxSpec(pip_packages=[...]) or use an image that has it"
            if missing
            else f"{type(exc).__name__}: {exc}"
        )
        return None, "could not load the task's function and arguments: " + hint


def _run_call(fn, args, kwargs, header, scope):
    """Run one call; (kind, body) of the frame that carries its outcome."""
    import types

    kind = "OK"
    try:
        try:
            result = fn(*args, **kwargs)
            if isinstance(result, types.CoroutineType):
                import asyncio

                result = asyncio.run(result)
        finally:
            if scope is not None:
                scope.close()
        body = _dumps(result)
        limit = int(header.get("max_result_bytes") or 0)
        ref_dir = header.get("ref_dir")
        if limit and len(body) > limit and ref_dir:
            kind, body = "REF", _write_reference(ref_dir, header.get("nonce", ""), body)
        elif limit and len(body) > limit:
            kind = "ERROR"
            message = (
                f"the task's result is {len(body)} bytes pickled, over the limit of {limit} bytes"
            )
            body = encode_error("too-large", message)
    except BaseException as exc:  # KeyboardInterrupt / SystemExit travel too
        import traceback

        kind = "RAISE"
        try:
            tb = exc.__traceback__.tb_next if exc.__traceback__ else None  # drop our frame
            text = "".join(traceback.format_exception(type(exc), exc, tb))
            body = _dumps(_exception_info(exc, text))
        except Exception as again:  # the info dict is plain data; this is a last resort
            body = _dumps(
                {
                    "type": "Exception",
                    "message": repr(again),
                    "traceback": "",
                    "base": None,
                    "exception": None,
                }
            )
    return kind, body


def _missing_needs(header):
    """The modules the call's header names (``needs``) that this sandbox cannot import."""
    needs = [name for name in (header.get("needs") or "").split(",") if name]
    return _missing_modules(needs) if needs else []


def _version_problem(header, mine, full):
    if header.get("protocol") != str(PROTOCOL):
        return "protocol", "bootstrap protocol {!r}, runner sent {!r}".format(
            PROTOCOL, header.get("protocol")
        )
    if header.get("python") != mine:
        return "python-version", (
            "the sandbox runs Python {} but the flow runs Python {}; cloudpickled "
            "functions load only on the same minor version".format(full, header.get("python"))
        )
    return None


def _read_first_line():
    """The first stdin line, read from fd 0 unbuffered: in warm mode the frames that
    follow are read from fd 0 by another reader, so nothing may sit in a buffer."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def main():
    _fast_site()
    stdin = sys.stdin.buffer
    header_line = _read_first_line()
    try:
        header = parse_fields(header_line.decode("utf-8"))
        nonce = header["nonce"]
    except Exception:
        sys.stderr.write("prefect-modal bootstrap: no call header on stdin; exiting\n")
        sys.exit(EXIT_BOOTSTRAP_FAILED)

    channel = os.dup(1)  # the private channel; not inherited by user subprocesses
    mine = "{}.{}".format(*sys.version_info[:2])
    hello = {"python": sys.version.split()[0], "protocol": PROTOCOL, "pid": os.getpid()}
    _write_frame(
        channel, nonce, "HELLO", " ".join("{}={}".format(*kv) for kv in hello.items()).encode()
    )
    if header_line.startswith(LOOP_GREETING):
        _serve(channel, nonce, mine, hello["python"])
        return

    def fail(reason, message):
        _write_frame(channel, nonce, "ERROR", encode_error(reason, message))
        os._exit(EXIT_BOOTSTRAP_FAILED)

    problem = _version_problem(header, mine, hello["python"])
    if problem:
        fail(*problem)

    payload = b""
    size = int(header["size"])
    if header.get("arg_ref"):
        payload, problem_text = _read_argument(header["arg_ref"], size)
        if payload is None:
            fail("payload", problem_text)
    while len(payload) < size:
        chunk = stdin.read(size - len(payload))
        if not chunk:
            fail("payload", f"stdin closed after {len(payload)} of {size} payload bytes")
        payload += chunk

    # From here on fd 1 belongs to the user; our channel is `channel`.
    pumps = _redirect_output()
    _install_logging(int(header.get("log_level") or 20))

    missing = _missing_needs(header)
    if missing:
        fail("missing", ",".join(missing))
    if header.get("context") == "1":
        _prefect_environment()

    loaded, problem_text = _load_call(payload)
    if loaded is None:
        fail("load", problem_text)
    fn, args, kwargs, context = loaded
    scope = _enter_run_context(context, channel, nonce) if context is not None else None
    kind, body = _run_call(fn, args, kwargs, header, scope)
    _drain_output(pumps)
    _write_frame(channel, nonce, kind, body)
    os._exit({"OK": 0, "REF": 0, "RAISE": 1}.get(kind, EXIT_BOOTSTRAP_FAILED))


def _read_stdin_frames(fd, session, calls, state):
    """Warm mode: everything on stdin is a frame of the session.  CALL frames queue up
    (one runs at a time); REPLY frames are the flow process's answers to the running
    call's nested submits, passed to that call's reply pipe; PING keeps the sandbox
    from its idle timeout while a long call runs.  EOF ends the loop."""
    reader = FrameReader(session)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            calls.append(None)
            state["ready"].release()
            return
        for kind, data in reader.feed(chunk.decode("ascii", "replace")):
            if kind == "CALL":
                calls.append(data)
                state["ready"].release()
            elif kind == "REPLY":
                with state["lock"]:
                    target = state["replies"]
                    if target is not None:
                        try:
                            os.write(target, data)
                        except OSError:
                            pass


def _serve(channel, session, mine, full):
    """Warm mode: serve calls one after another until stdin ends.

    Each call is a CALL frame holding the per-call header line and payload; its
    outcome goes out as one frame of the session on the channel, after a marked
    end line on stderr (so the runner knows every output line of the call has
    arrived before it settles the call).  Module state persists between calls:
    that is what a warm sandbox is for.
    """
    stdin_fd = os.dup(0)  # the user's code gets /dev/null as stdin
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    calls = []  # type: list
    state = {"replies": None, "lock": threading.Lock(), "ready": threading.Semaphore(0)}  # type: dict
    threading.Thread(
        target=_read_stdin_frames, args=(stdin_fd, session, calls, state), daemon=True
    ).start()
    logging_installed = False
    while True:
        state["ready"].acquire()
        body = calls.pop(0)
        if body is None:
            os._exit(0)
        header_line, _, payload = body.partition(b"\n")
        header = parse_fields(header_line.decode("utf-8", "replace"))
        nonce = header.get("nonce", "")
        problem_text = ""
        if header.get("arg_ref"):
            payload, problem_text = _read_argument(header["arg_ref"], int(header["size"]))

        def finish(kind, data, nonce=nonce):
            _emit_line(END_TAG, nonce)
            _write_frame(channel, session, kind, data)

        problem = _version_problem(header, mine, full)
        if problem:
            finish("ERROR", encode_error(*problem))
            os._exit(EXIT_BOOTSTRAP_FAILED)
        pumps = _redirect_output()
        if not logging_installed:
            _install_logging(int(header.get("log_level") or 20))
            logging_installed = True
        missing = _missing_needs(header)
        if missing:
            _drain_output(pumps)
            finish("ERROR", encode_error("missing", ",".join(missing)))
            continue
        if header.get("context") == "1":
            _prefect_environment()
        loaded, problem_text = _load_call(payload) if payload is not None else (None, problem_text)
        if loaded is None:
            _drain_output(pumps)
            finish("ERROR", encode_error("load", problem_text))
            continue
        fn, args, kwargs, context = loaded
        scope = None
        reply_write = None
        if context is not None:
            reply_read, reply_write = os.pipe()
            with state["lock"]:
                state["replies"] = reply_write

            def send(kind, data):
                _write_frame(channel, session, kind, data)

            scope = _enter_run_context(context, channel, nonce, send=send, replies=reply_read)
        kind, body = _run_call(fn, args, kwargs, header, scope)
        del fn, args, kwargs, context, loaded
        if reply_write is not None:
            with state["lock"]:
                state["replies"] = None
            os.close(reply_write)  # the call's reply reader sees EOF
        _drain_output(pumps)
        finish(kind, body)


if __name__ == "__main__":
    main()
