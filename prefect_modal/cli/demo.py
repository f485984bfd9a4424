"""`prefect-modal demo`: the README's main job, from nothing to a summary table.

It starts what it needs (a Prefect server on 127.0.0.1 unless PREFECT_API_URL
is set, the local Modal server, a `modal` work pool and its worker), runs the
example flows of `flows/` in both modes, prints a table of flow runs and their
sandboxes, and stops everything it started (by pid) unless `--keep` is given.
The exit code is non-zero when any run did not complete.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from uuid import UUID

from rich.console import Console
from rich.table import Table

from prefect_modal.cli.services import (
    Service,
    Stopped,
    start_local_modal,
    start_prefect_server,
    start_worker,
    stop_on_signals,
)

REPO_FLOWS = Path(__file__).resolve().parents[2] / "flows"
POOL_NAME = "modal-demo"


@dataclass
class RunSummary:
    """One row of the final table."""

    flow: str
    mode: str
    flow_run_id: UUID | None
    state: str
    seconds: float
    sandboxes: list[Any] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "Completed"


def _load_module(path: Path) -> ModuleType:
    """Import an example flow file by path, as `python flows/x.py` would see it."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    """Point this process (and the flows and processes it starts) at the demo's services.

    Prefect reads its settings once per context, so the API URL also goes
    through `temporary_settings`; child processes get the environment.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        if "PREFECT_API_URL" in updates:
            with temporary_settings(updates={PREFECT_API_URL: updates["PREFECT_API_URL"]}):
                yield
        else:
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_in_process(flow_obj: Any, mode: str, **params: Any) -> RunSummary:
    started = time.monotonic()
    state = flow_obj(return_state=True, **params)
    return RunSummary(
        flow=flow_obj.name,
        mode=mode,
        flow_run_id=state.state_details.flow_run_id,
        state=state.name or str(state.type),
        seconds=time.monotonic() - started,
        error=None if state.is_completed() else str(state.message),
    )


def _run_deployment(name: str, timeout: float, mode: str) -> RunSummary:
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    started = time.monotonic()
    flow_run: FlowRun = run_deployment(name, timeout=timeout, poll_interval=1)  # type: ignore[assignment]
    state = flow_run.state
    return RunSummary(
        flow=name.split("/")[0],
        mode=mode,
        flow_run_id=flow_run.id,
        state=(state.name if state else "Unknown") or "Unknown",
        seconds=time.monotonic() - started,
        error=None if state is not None and state.is_completed() else str(state and state.message),
    )


def _create_pool_and_deployments(flows_dir: Path) -> list[tuple[str, str]]:
    """The `modal` work pool and two deployments of the example flows."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from prefect_modal.worker.worker import ModalWorker

    async def create_pool() -> None:
        async with get_client() as client:
            try:
                await client.create_work_pool(
                    WorkPoolCreate(
                        name=POOL_NAME,
                        type="modal",
                        base_job_template=ModalWorker.get_default_base_job_template(),
                    )
                )
            except ObjectAlreadyExists:
                pass

    asyncio.run(create_pool())
    deployments = []
    for entrypoint, name, variables, mode in (
        ("pipeline.py:etl", "etl-demo", {}, "pipeline"),
        ("hello.py:hello", "hello-per-step", {"mode": "per_step"}, "per_step via worker"),
    ):
        flow_obj: Any = Flow.from_source(source=str(flows_dir), entrypoint=entrypoint)
        with redirect_stdout(io.StringIO()):  # deploy() prints a table of its own
            flow_obj.deploy(
                name=name,
                work_pool_name=POOL_NAME,
                job_variables=variables,
                build=False,
                push=False,
                print_next_steps=False,
            )
        deployments.append((f"{flow_obj.name}/{name}", mode))
    return deployments


def _summary_tables(runs: list[RunSummary]) -> list[Table]:
    """Two tables: the flow runs, then every sandbox they used (one row each).

    A run's sandbox ends a moment after the run reports its final state; the
    records are read once they are final (within `status.FINAL_GRACE_SECONDS`).
    """
    from prefect_modal.core.artifacts import cost_note
    from prefect_modal.core.pricing import format_cost
    from prefect_modal.status import wait_for_final_records

    for run in runs:
        try:
            run.sandboxes = wait_for_final_records(run.flow_run_id) if run.flow_run_id else []
        except Exception as exc:  # the table must print even if the API hiccups
            run.error = (run.error or "") + f" (could not read sandbox artifacts: {exc})"
    flows = Table(title="Flow runs")
    for column in ("flow", "mode", "state", "seconds", "sandboxes"):
        flows.add_column(column, overflow="fold")
    boxes = Table(title="Sandboxes")
    for column in ("flow", "task", "sandbox", "status", "gpu", "cpu", "MiB", "seconds"):
        boxes.add_column(column, overflow="fold")
    boxes.add_column("est. cost", justify="right")
    for run in runs:
        state = run.state if run.ok else f"[red]{run.state}[/red] {run.error or ''}"
        flows.add_row(run.flow, run.mode, state, f"{run.seconds:.1f}", str(len(run.sandboxes)))
        for box in run.sandboxes:
            status = box.status + (f" ({box.exit_code})" if box.exit_code not in (None, 0) else "")
            seconds = (
                f"{(box.ended_at - box.started_at).total_seconds():.1f}" if box.ended_at else "-"
            )
            boxes.add_row(
                run.flow,
                (box.task_name or "(whole run)")
                + (f" ({len(box.calls)} calls, warm)" if box.calls is not None else ""),
                box.sandbox_id,
                status,
                str(box.resources.get("gpu") or "-"),
                str(box.resources.get("cpu") or "-"),
                str(box.resources.get("memory_mib") or "-"),
                seconds,
                format_cost(box.estimated_cost()),
            )
    every = [box for run in runs for box in run.sandboxes]
    if every:
        total = sum(c for box in every if (c := box.estimated_cost()) is not None)
        boxes.add_row("total", "", f"{len(every)} sandboxes", *[""] * 5, format_cost(total))
        boxes.caption = cost_note(every)
    return [flows, boxes]


def run_demo(
    keep: bool = False,
    flows_dir: Path = REPO_FLOWS,
    workdir: Path | None = None,
    timeout: float = 300,
    console: Console | None = None,
) -> int:
    """Run the demo; return the exit code (0 when every run completed).

    SIGINT (Ctrl-C), SIGTERM and SIGHUP (a closed terminal) stop it at any
    point, `--keep`'s wait included, and everything it started is stopped.
    """
    try:
        with stop_on_signals():
            return _run_demo(keep, flows_dir, workdir, timeout, console)
    except Stopped as stopped:
        (console or Console()).print(
            f"Stopped by {stopped}; everything the demo started is stopped."
        )
        return stopped.exit_code


def _run_demo(
    keep: bool,
    flows_dir: Path,
    workdir: Path | None,
    timeout: float,
    console: Console | None,
) -> int:
    # Piped or in CI, rich falls back to 80 columns and folds every sandbox id.
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    if not (flows_dir / "hello.py").exists():
        console.print(
            f"[red]No example flows in {flows_dir}.[/red] Run the demo from a clone of the "
            "prefect-modal repository, or pass --flows-dir."
        )
        return 2
    workdir = workdir or Path(tempfile.mkdtemp(prefix="prefect-modal-demo-"))
    services: list[Service] = []
    runs: list[RunSummary] = []
    ui_url: str | None = None
    interrupted = False
    try:
        env: dict[str, str] = {}
        with console.status("Starting services...") as status:
            if os.environ.get("PREFECT_API_URL"):
                ui_url = os.environ["PREFECT_API_URL"].removesuffix("/api")
                console.print(f"Using the Prefect API at {os.environ['PREFECT_API_URL']}")
            else:
                status.update("Starting a Prefect server on 127.0.0.1 (first start takes ~20 s)...")
                server = start_prefect_server(workdir / "prefect")
                services.append(server)
                assert server.url is not None
                env["PREFECT_API_URL"] = server.url
                env["PREFECT_HOME"] = str(workdir / "prefect")
                ui_url = server.url.removesuffix("/api")
                console.print(f"[green]✓[/green] Prefect server at {ui_url} (pid {server.pid})")
            status.update("Starting the local Modal server...")
            modal_server = start_local_modal(workdir / "modal", host_dirs=[flows_dir])
            services.append(modal_server)
            env.update(modal_server.env)
            env["PREFECT_MODAL_TARGET"] = "local"
            console.print(
                f"[green]✓[/green] Local Modal server at {modal_server.url} "
                f"(pid {modal_server.pid})"
            )
        with _environ(env):
            runs.extend(_run_all(console, flows_dir, workdir, services, timeout))
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP (`Stopped`): just stop
        interrupted = True
        raise
    finally:
        try:
            if runs and not interrupted:
                _print_summary(console, runs, env, ui_url)
            if ui_url and not interrupted:
                console.print(f"Prefect UI: {ui_url}  (flow runs: {ui_url}/runs)")
            if keep and services and not interrupted:
                console.print(
                    "[bold]--keep:[/bold] services stay up; press Ctrl-C (or send SIGTERM / "
                    f"SIGHUP to pid {os.getpid()}) to stop them."
                )
                _block_until_interrupted()
        finally:
            for service in reversed(services):
                service.stop()
    failed = [r for r in runs if not r.ok]
    if failed or not runs:
        console.print(f"[red]{len(failed)} of {len(runs)} runs did not complete.[/red]")
        return 1
    console.print(f"[green]All {len(runs)} runs completed.[/green]")
    return 0


def _print_summary(
    console: Console, runs: list[RunSummary], env: dict[str, str], ui_url: str | None
) -> None:
    with _environ(env):
        for table in _summary_tables(runs):
            console.print(table)
    if ui_url:
        console.print("Look at them in the Prefect UI:")
        for run in runs:
            console.print(f"  {run.flow} ({run.mode}): {ui_url}/runs/flow-run/{run.flow_run_id}")


def _run_all(
    console: Console, flows_dir: Path, workdir: Path, services: list[Service], timeout: float
) -> list[RunSummary]:
    runs: list[RunSummary] = []

    def step(label: str, action: Callable[[], RunSummary]) -> None:
        with console.status(label):
            summary = action()
        mark = "[green]✓[/green]" if summary.ok else "[red]✗[/red]"
        console.print(
            f"{mark} {summary.flow} ({summary.mode}): {summary.state} in {summary.seconds:.1f}s"
        )
        runs.append(summary)

    hello = _load_module(flows_dir / "hello.py")
    ml = _load_module(flows_dir / "ml_pipeline.py")
    step("Running flows/hello.py (per-step: each task in its own sandbox)...",
         lambda: _run_in_process(hello.hello, "per_step"))  # fmt: skip
    step("Running flows/ml_pipeline.py (CPU preprocess, GPU train, GPU evaluate)...",
         lambda: _run_in_process(ml.ml_pipeline, "per_step", samples=300))  # fmt: skip
    interpreter = flows_dir / "code_interpreter.py"
    if interpreter.exists():
        ci = _load_module(interpreter)
        step("Running flows/code_interpreter.py (sessions from one snapshot, in parallel)...",
             lambda: _run_in_process(ci.code_interpreter, "sessions"))  # fmt: skip

    with console.status("Creating the 'modal' work pool and deployments, starting a worker..."):
        deployments = _create_pool_and_deployments(flows_dir)
        worker = start_worker(POOL_NAME, dict(os.environ), workdir / "logs")
        services.append(worker)
    console.print(f"[green]✓[/green] Worker for pool '{POOL_NAME}' (pid {worker.pid})")
    for name, mode in deployments:
        step(f"Running deployment {name} through the worker ({mode})...",
             lambda name=name, mode=mode: _run_deployment(name, timeout, mode))  # type: ignore[misc]  # fmt: skip
    return runs


def _block_until_interrupted() -> None:
    """Wait for Ctrl-C; SIGTERM and SIGHUP (`Stopped`) propagate to exit with their code."""
    try:
        while True:
            time.sleep(1)
    except Stopped:
        raise
    except KeyboardInterrupt:
        pass
