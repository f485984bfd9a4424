"""`SandboxProcess`: one command running in a session, its output streamed as it comes.

Two threads follow the command's stdout and stderr: each line goes to the
logs of the run that started the command at once (secret values redacted),
and to the caller's iterator when the command was started with
`exec_stream`; `wait()` gathers the whole output into an `ExecResult` and
notes the command in the session's record.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextvars import copy_context
from typing import TYPE_CHECKING, Any, Literal

from prefect_modal.core import modal_api
from prefect_modal.sessions.errors import SessionError
from prefect_modal.sessions.records import COMMAND_CHARS
from prefect_modal.sessions.results import ExecResult, OutputLine

if TYPE_CHECKING:
    from prefect_modal.sessions.session import SandboxSession


class SandboxProcess:
    """A command running in a session: iterate it for its output lines as they come,
    `wait()` for its `ExecResult`.

    Every line is also logged on the run that started the command (stdout at
    INFO, stderr at WARNING), whether or not anyone iterates.
    """

    def __init__(
        self,
        session: SandboxSession,
        command: tuple[str, ...],
        process: Any,
        run_logger: Any,
        timeout: int | None,
        streaming: bool,
    ) -> None:
        self.command = command
        self._session = session
        self._process = process
        self._logger = run_logger
        self._timeout = timeout
        self._started = time.monotonic()
        self._lines: queue.Queue[OutputLine | None] | None = queue.Queue() if streaming else None
        self._text: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._result: ExecResult | None = None
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(
                target=copy_context().run,
                args=(self._follow, name, reader),
                name=f"prefect-modal-session-{name}",
                daemon=True,
            )
            for name, reader in (("stdout", process.stdout), ("stderr", process.stderr))
        ]
        for thread in self._threads:
            thread.start()

    def _follow(self, stream: Literal["stdout", "stderr"], reader: Any) -> None:
        pending = ""
        try:
            for chunk in reader:
                self._text[stream].append(chunk)
                pending += chunk
                *complete, pending = pending.split("\n")
                for line in complete:
                    self._emit(stream, line)
            if pending:
                self._emit(stream, pending)
        except Exception as exc:  # a dropped stream must not hang the caller
            self._emit("stderr", f"[prefect-modal] {stream} of the command ended early: {exc}")
        finally:
            if self._lines is not None:
                self._lines.put(None)

    def _emit(self, stream: Literal["stdout", "stderr"], line: str) -> None:
        line = line.rstrip("\r")
        shown = self._session._redact(line)
        level = logging.INFO if stream == "stdout" else logging.WARNING
        self._logger.log(level, "[session %s] %s", self._session.session_id, shown)
        if self._lines is not None:
            self._lines.put(OutputLine(stream, line))

    def __iter__(self) -> Iterator[OutputLine]:
        if self._lines is None:
            raise SessionError("iterate the handle of exec_stream(); exec() returns a result")
        ended = 0
        while ended < 2:
            item = self._lines.get()
            if item is None:
                ended += 1
                continue
            yield item

    @property
    def returncode(self) -> int | None:
        """None while the command runs."""
        return self._result.returncode if self._result else self._process.poll()

    def wait(self) -> ExecResult:
        """Block until the command ends; its result (the same one on every call)."""
        with self._lock:
            if self._result is not None:
                return self._result
            code = modal_api.process_wait(self._process)
            for thread in self._threads:
                thread.join(timeout=30)
            seconds = time.monotonic() - self._started
            # -1 is the client's own word for "its timeout fired" (modal/container_process.py:
            # ExecTimeoutError -> -1; docs/modal-rules.md); our clock starts after the exec's
            # start returned, so it may read less than the timeout under load.
            timed_out = self._timeout is not None and (
                code == -1 or (code != 0 and seconds >= self._timeout)
            )
            if timed_out:
                self._logger.warning(
                    "[session %s] %s timed out after %s s (exit code %s)",
                    self._session.session_id,
                    self._session._redact(" ".join(self.command))[:COMMAND_CHARS],
                    self._timeout,
                    code,
                )
            self._result = ExecResult(
                command=self.command,
                returncode=code,
                stdout="".join(self._text["stdout"]),
                stderr="".join(self._text["stderr"]),
                seconds=seconds,
                timed_out=timed_out,
            )
            self._session._note_command(self._result)
            return self._result
