"""``pmlm export``: the workspace's prompt table → parquet, JSONL and an SQL table, with a manifest.

A thin wrapper over `promptenv.steps.export_workspace`. Mounted by ``flows.cli``
as ``app.command("export")(export_cmd)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flows.options import WorkspaceOpt
from pipelines.workspace import Workspace

console = Console()

#: Every export form (`promptenv.steps.EXPORT_FORMATS`; spelled out so that `pmlm --help` stays quick).
DEFAULT_FORMATS = "parquet,jsonl,sql"


def export_cmd(
    workspace: WorkspaceOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder of the exported files (default: WORKSPACE/export)."),
    ] = None,
    formats: Annotated[
        str, typer.Option("--formats", help="Comma-separated: parquet, jsonl, sql.")
    ] = DEFAULT_FORMATS,
    sql_url: Annotated[
        str | None,
        typer.Option(
            "--sql-url",
            help="SQLAlchemy URL of the SQL export (default: sqlite:///OUT/prompts.sqlite).",
        ),
    ] = None,
) -> None:
    """Export the prompt table for apps (parquet, JSONL, SQL) with a manifest of its inputs."""
    from promptenv.steps import export_workspace

    ws = Workspace.at(workspace)
    chosen = [f.strip() for f in formats.split(",") if f.strip()]
    written = export_workspace(ws, formats=chosen, sql_url=sql_url, out=out)
    if written.stale_recommenders:
        console.print(
            f"[yellow]Note:[/] the prompt table was built with {', '.join(written.stale_recommenders)}, "
            f"but the selected recommender is now {written.selected_recommender}: rebuild it with "
            "`pmlm prompts build`."
        )
    result = written.result
    console.print(f"{result.rows} prompts exported:")
    for fmt, where in result.files.items():
        console.print(f"  {fmt:8} {where}", markup=False)
    console.print(f"  manifest {result.manifest_path}", markup=False)
