"""``pmlm serve``: the nightly refresh and an on-demand evaluation, served as Prefect deployments.

`deployments` builds them (nothing runs, nothing is sent); ``pmlm serve``
registers them with the Prefect API (``PREFECT_API_URL``) and runs their flow
runs in this process until it is stopped. Stopping it (Ctrl-C, or SIGTERM from
systemd or a container runtime) leaves the schedules active (Prefect's default
pauses them), so a restarted ``pmlm serve`` carries on with the nightly refresh.
Mounted by ``flows.cli`` as ``app.command("serve")(serve_cmd)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from flows.errors import prefect_defaults
from flows.options import WorkspaceOpt
from pipelines.workspace import Workspace

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

console = Console()

NIGHTLY_CRON = "0 2 * * *"
NIGHTLY = "nightly-refresh"
ON_DEMAND = "on-demand-evaluation"


def deployments(
    workspace: Path,
    *,
    cron: str = NIGHTLY_CRON,
    timezone: str = "UTC",
    source: str = "default",
    backend: str = "local",
) -> list[RunnerDeployment]:
    """The two deployments of a workspace: ``pmlm-refresh/nightly-refresh`` on ``cron``
    (in ``timezone``), and ``pmlm-evaluate/on-demand-evaluation``, which runs when asked.

    Raises ValueError for a cron string or time zone that Prefect rejects.
    """
    from prefect.deployments.runner import EntrypointType, RunnerDeployment
    from prefect.schedules import Cron

    from flows.pipeline import evaluate, refresh

    root = str(workspace.resolve())
    # by module path: the runner imports `flows.pipeline` whatever its working directory
    by_module = EntrypointType.MODULE_PATH
    nightly = RunnerDeployment.from_flow(
        refresh,
        name=NIGHTLY,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"workspace": root, "source": source},
        description=(
            "Re-ingest the records, recompute signals and prompts for the patients whose records "
            "changed (the recommender is not refit), export the prompt table."
        ),
        tags=["pmlm"],
        entrypoint_type=by_module,
    )
    on_demand = RunnerDeployment.from_flow(
        evaluate,
        name=ON_DEMAND,
        parameters={"workspace": root, "backend": backend},
        description="Compare the prompt methods with one LLM on the same test encounters.",
        tags=["pmlm"],
        entrypoint_type=by_module,
    )
    return [nightly, on_demand]


def serve_cmd(
    workspace: WorkspaceOpt = None,
    cron: Annotated[
        str,
        typer.Option(help="When the nightly refresh runs (cron: minute hour day month weekday)."),
    ] = NIGHTLY_CRON,
    timezone: Annotated[
        str, typer.Option(help="Time zone of --cron (IANA name, e.g. Europe/Paris).")
    ] = "UTC",
    source: Annotated[
        str,
        typer.Option(
            help="What the refresh ingests: default, fhir:FOLDER, omop, omop:PATH, or workspace "
            "(the tables another job ingested)."
        ),
    ] = "default",
    backend: Annotated[
        str, typer.Option(help="Default LLM backend spec of the on-demand evaluation.")
    ] = "local",
) -> None:
    """Serve the nightly refresh (on --cron) and an on-demand evaluation against a Prefect server."""
    prefect_defaults()  # before Prefect reads its settings
    from prefect import serve
    from prefect.settings import get_current_settings

    ws = Workspace.at(workspace)
    try:
        served = deployments(ws.root, cron=cron, timezone=timezone, source=source, backend=backend)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not get_current_settings().api.url:
        # a temporary server would hold the deployments only while this process lives, and
        # nothing else could trigger them
        typer.echo(
            "error: pmlm serve needs a Prefect server: start one (`prefect server start`) "
            "and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)",
            err=True,
        )
        raise typer.Exit(code=1)
    console.print(
        f"Serving {NIGHTLY} ({cron}, {timezone}) and {ON_DEMAND} for workspace {ws.root.resolve()}.\n"
        f"Run the evaluation with: prefect deployment run 'pmlm-evaluate/{ON_DEMAND}'",
        markup=False,
    )
    # not paused on shutdown: a restart by systemd or the container runtime resumes the schedule
    serve(*served, pause_on_shutdown=False)
