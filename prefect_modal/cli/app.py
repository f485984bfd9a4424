"""`prefect-modal`: the command line, in Prefect's CLI style (Typer + rich tables).

Every command that talks to Modal uses the same target rule as the task
runner and the worker (a `--credentials` block, else Modal's ambient config,
which includes the variables `prefect-modal local serve` prints).  Errors are
one line that says what to do next, as Prefect's own CLI does.
"""

from __future__ import annotations

import asyncio
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, NoReturn
from uuid import UUID

import typer
from rich.console import Console
from rich.table import Table

from prefect_modal.cli.demo import REPO_FLOWS, run_demo
from prefect_modal.cli.pool import pool_app
from prefect_modal.core import tags
from prefect_modal.local.cli import local_app

app = typer.Typer(
    name="prefect-modal",
    help="Run Prefect flows and tasks in Modal Sandboxes, on Modal or on a local Modal server.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(local_app, name="local")
app.add_typer(pool_app, name="pool")
console = Console(highlight=False)

CredentialsOption = Annotated[
    str | None,
    typer.Option(
        "--credentials",
        "-c",
        help="Name of a saved ModalCredentials block; default: Modal's own config.",
    ),
]


def exit_with_error(message: str, code: int = 1) -> NoReturn:
    """One red line on stderr and a non-zero exit, like Prefect's CLI."""
    # soft_wrap: one line however narrow the terminal (or a pipe's 80 columns).
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[red]{message}[/red]", markup=True
    )
    raise typer.Exit(code)


def _client(credentials: str | None) -> Any:
    """A modal client for the CLI: never an ad-hoc local server of its own."""
    from prefect_modal.core.credentials import ModalCredentials, ambient_credentials_present
    from prefect_modal.core.targets import TargetError, resolve_target

    # Listing a flow run's sandboxes by tag spans apps (their app is the user's
    # choice); modal 1.6 warns about that on every call, which is noise here.
    warnings.filterwarnings("ignore", message=r".*Listing Sandboxes without an `app_id`")
    block: ModalCredentials | None = None
    if credentials:
        try:
            block = ModalCredentials.load(credentials)  # type: ignore[assignment]
        except ValueError:
            exit_with_error(
                f"No ModalCredentials block named {credentials!r}. "
                "List them with `prefect block ls`."
            )
    elif not ambient_credentials_present():
        exit_with_error(
            "No Modal credentials found. Run `modal token new`, pass --credentials BLOCK, or "
            "for the local server export the variables `prefect-modal local serve` prints."
        )
    try:
        return resolve_target(block).client
    except TargetError as exc:
        exit_with_error(str(exc))


def _flow_run_id(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        exit_with_error(f"{value!r} is not a flow run id (a UUID, as `prefect flow-run ls` shows).")


@app.command()
def status(
    flow_run_id: Annotated[
        str | None, typer.Argument(help="Flow run id; default: the 10 latest flow runs.")
    ] = None,
    credentials: CredentialsOption = None,
) -> None:
    """Show the sandboxes of a flow run with their live status from Modal."""
    from prefect_modal.status import flow_run_sandboxes

    if flow_run_id is None:
        _recent_runs()
        return
    run_id = _flow_run_id(flow_run_id)
    reports = flow_run_sandboxes(run_id, client=_client(credentials))
    if not reports:
        console.print(f"Flow run {run_id} has no Modal sandboxes.")
        return
    from prefect_modal.core.artifacts import cost_note
    from prefect_modal.core.pricing import format_cost
    from prefect_modal.status import lingering_note, run_state

    state = run_state(run_id)
    table = Table(title=f"Sandboxes of flow run {run_id}" + (f" ({state.name})" if state else ""))
    columns = ("sandbox", "task", "attempt", "status", "exit", "gpu", "cpu", "MiB", "seconds")
    for column in (*columns, "est. cost", "see"):
        table.add_column(column, overflow="fold")
    for report in reports:
        rec = report.record
        res = rec.resources if rec else {}
        seconds = rec.seconds if rec else None
        task = _task_label(rec)
        if rec is not None and rec.warm:  # a warm sandbox: the task runs it served, in order
            task = _warm_label(report.calls)
        table.add_row(
            report.sandbox_id,
            task,
            str(rec.attempt) if rec and rec.attempt is not None else "-",
            report.display_status(state),
            "-" if report.returncode is None else str(report.returncode),
            str(res.get("gpu") or "-"),
            str(res.get("cpu") or "-"),
            str(res.get("memory_mib") or "-"),
            "-" if seconds is None else f"{seconds:.1f}",
            format_cost(rec.estimated_cost() if rec else None),
            (rec.link if rec else None) or f"prefect-modal logs {report.sandbox_id}",
        )
    console.print(table)
    records = [r.record for r in reports if r.record is not None]
    if records:
        console.print(cost_note(records))
    note = lingering_note(reports, state)
    if note:
        console.print(note)


def _warm_label(calls: Any) -> str:
    """A warm sandbox's task runs, in the order it ran them."""
    if not calls:
        return "warm, no call (started ahead, not needed)"
    count = f"{len(calls)} call{'s' if len(calls) != 1 else ''}: "
    return count + ", ".join(f"{c.task_name} ({str(c.task_run_id)[:8]})" for c in calls)


def _task_label(rec: Any) -> str:
    """What the sandbox did for the run: a task's call, the run itself, or a session."""
    name = (rec.task_name if rec else None) or "(flow run)"
    if rec is not None and rec.mode == "session":
        return f"session in {rec.task_name or 'the flow body'}"
    return name


def _recent_runs(limit: int = 10) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    from prefect_modal.core.artifacts import read_sandbox_artifacts
    from prefect_modal.core.pricing import current_rates, format_cost

    async def latest() -> list[Any]:
        async with get_client() as client:
            return await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=limit)

    try:
        runs = asyncio.run(latest())
    except Exception as exc:
        exit_with_error(f"Cannot reach the Prefect API ({exc}). Is PREFECT_API_URL set?")
    table = Table(title="Latest flow runs")
    for column in ("flow run", "name", "state", "sandboxes", "est. cost"):
        table.add_column(column, overflow="fold")
    total = 0.0
    for run in runs:
        records = read_sandbox_artifacts(run.id)
        counts: dict[str, int] = {}
        for rec in records:
            counts[rec.status] = counts.get(rec.status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "-"
        costs = [c for rec in records if (c := rec.estimated_cost()) is not None]
        total += sum(costs)
        cost = format_cost(sum(costs)) if costs else "-"
        table.add_row(str(run.id), run.name, run.state_name or "-", summary, cost)
    console.print(table)
    console.print(
        f"Estimated cost of these runs' sandboxes: {format_cost(total)} at "
        f"{current_rates().label}; an estimate, not a bill."
    )


@app.command()
def logs(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id, e.g. sb-...")],
    credentials: CredentialsOption = None,
) -> None:
    """Print a sandbox's output (stdout, then stderr); follows it while it runs."""
    from prefect_modal.core import modal_api
    from prefect_modal.task_runner import remote

    client = _client(credentials)
    try:
        sandbox = modal_api.from_id(sandbox_id, client)
    except modal_api.NotFoundError:
        exit_with_error(f"No sandbox {sandbox_id!r} on this Modal target (it may have expired).")
    except Exception as exc:
        exit_with_error(f"Cannot look up sandbox {sandbox_id!r}: {exc}")

    # A task sandbox's stdout is the runner's private result channel (framed,
    # base64) and its stderr carries the user's output with origin markers
    # (see `remote.py`): show the user's lines, unmarked, where they were printed.
    try:
        found = modal_api.sandbox_tags(sandbox)
        task_sandbox = tags.TASK_RUN in found or tags.WARM in found
    except Exception:
        task_sandbox = False

    def show(stream: str, line: str) -> None:
        if stream == "stdout":
            if not task_sandbox:
                sys.stdout.write(line + "\n")
            return
        origin, _level, text = remote.classify_line(line)
        if origin in ("bootstrap", "end"):
            return
        (sys.stdout if origin in ("stdout", "log") else sys.stderr).write(text + "\n")

    threads = modal_api.stream_output(sandbox, show)
    code = modal_api.wait_returncode(sandbox)
    for thread in threads:
        thread.join()
    Console(stderr=True, highlight=False).print(f"[dim]{sandbox_id} exited with code {code}[/dim]")


@app.command()
def cancel(
    flow_run_id: Annotated[str, typer.Argument(help="Flow run id.")],
    credentials: CredentialsOption = None,
    wait: Annotated[
        float,
        typer.Option(
            help="Seconds to let the run's own process report its end before it is marked "
            "Cancelled (it would otherwise report the killed sandbox as a failure after us)."
        ),
    ] = 20,
) -> None:
    """Mark a flow run Cancelling, terminate every sandbox of it, then mark it Cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled, Cancelling

    from prefect_modal.status import terminate_sandboxes

    run_id = _flow_run_id(flow_run_id)
    modal_client = _client(credentials)
    message = "Cancelled with `prefect-modal cancel`."
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
            was_final = run.state is not None and run.state.is_final()
            if not was_final:
                # Cancelling first: a worker watching the run, the UI and anyone
                # reading the run see the cancellation before its sandboxes die.
                client.set_flow_run_state(run_id, Cancelling(message=message), force=True)
    except ObjectNotFound:
        exit_with_error(f"No flow run {run_id} on this Prefect API ({_api_url()}).")
    except Exception as exc:
        exit_with_error(f"Cannot reach the Prefect API ({exc}). Is PREFECT_API_URL set?")

    terminated = terminate_sandboxes(flow_run_id=run_id, client=modal_client)
    outcome = f"already {run.state.name if run.state else 'final'}"
    try:
        with get_client(sync_client=True) as client:
            if not was_final:
                # A flow started outside a worker still runs in its own process: it
                # sees its task's sandbox killed and reports the task Failed, then
                # the run (refused while the run is Cancelling, accepted once it is
                # Cancelled).  So: Cancelled only after that process is done.
                state = _settle(client, run_id, wait if terminated else 0)
                if state is not None and state.is_completed():
                    outcome = "Completed (it finished before it could be cancelled)"
                else:
                    if state is None or not state.is_cancelled():  # e.g. a worker did it
                        client.set_flow_run_state(run_id, Cancelled(message=message), force=True)
                    outcome = "Cancelled"
    except Exception as exc:
        exit_with_error(
            f"Terminated {len(terminated)} sandbox(es) but could not cancel the run: {exc}"
        )
    console.print(
        f"Terminated {len(terminated)} sandbox(es)"
        + (f" ({', '.join(terminated)})" if terminated else "")
        + f"; flow run {run_id} is {outcome}.",
        soft_wrap=True,
    )


def _settle(client: Any, run_id: UUID, wait: float, grace: float = 4.0) -> Any:
    """The run's state once its own process, if any, is done reporting (or `wait` passed).

    Done means: the run is final, or none of its task runs has been Pending or
    Running for `grace` seconds (the engine reports the run right after its tasks).
    """
    import time

    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + wait
    quiet_since: float | None = None
    while True:
        state = client.read_flow_run(run_id).state
        now = time.monotonic()
        if now >= deadline or (state is not None and state.is_final()):
            return state
        active = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
            task_run_filter=TaskRunFilter(
                state=TaskRunFilterState(
                    type=TaskRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING])
                )
            ),
            limit=1,
        )
        if active:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= grace:
            return state
        time.sleep(0.5)


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or "PREFECT_API_URL is not set")


@app.command()
def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the servers and worker up to explore the UI.")
    ] = False,
    flows_dir: Annotated[Path, typer.Option(help="Directory with the example flows.")] = REPO_FLOWS,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each deployment run.")] = 300,
) -> None:
    """Run the example flows in both modes on the local Modal server, then print a summary.

    Starts a Prefect server (unless PREFECT_API_URL is set), the local Modal
    server and a `modal` worker; stops them all at the end.
    """
    raise typer.Exit(run_demo(keep=keep, flows_dir=flows_dir, timeout=timeout))


if __name__ == "__main__":
    app()
