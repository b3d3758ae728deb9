"""``pmlm export``: the workspace's prompt table → parquet, JSONL and an SQL table, with a manifest.

A thin wrapper over `pipelines.export.export_table`; this module only gathers
what the manifest records about the inputs (data hash, recommender, policy,
LLM). Mounted by ``flows.cli`` as ``app.command("export")(export_cmd)``.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.parquet as pq
import typer
from rich.console import Console

from flows.errors import exit_for as _fail
from flows.options import WorkspaceOpt
from pipelines.schemas import PATIENT_TABLES
from pipelines.workspace import MissingTableError, Workspace

console = Console()

#: The table exported, and the name of its files and SQL table (`promptenv.prompt_table.PROMPT_TABLE`).
PROMPT_TABLE = "prompts"
#: Every export form (`pipelines.export.FORMATS`; spelled out so that `pmlm --help` stays quick).
DEFAULT_FORMATS = "parquet,jsonl,sql"

#: The canonical tables the prompts are built from: their bytes make ``input_data_hash``.
INPUT_TABLES = PATIENT_TABLES
POLICY_INFO = Path("models") / "policy" / "policy.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}): rewrite it with the step that made it"
        ) from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def read_prompt_table(ws: Workspace) -> pa.Table:
    """The workspace's prompt table as arrow (its own schema); an actionable error when absent."""
    path = ws.table_path(PROMPT_TABLE)
    if not path.exists():
        raise MissingTableError(
            f"{path} does not exist: build the prompt table first with "
            f"`pmlm prompts build -w {ws.root}` (or run the whole job with `pmlm run -w {ws.root}`)"
        )
    return pq.read_table(path)


def recommender_info(ws: Workspace, table: pa.Table) -> dict[str, Any]:
    """The selected recommender (``selection.json``, its saved metadata) and those the table names."""
    from recsys.steps import models_dir, read_selection

    in_table = sorted(v for v in set(table.column("recommender").to_pylist()) if v)
    selection = read_selection(ws)
    best = selection.get("best")
    info: dict[str, Any] = {"selected": best, "in_prompt_table": in_table}
    if best is None:
        return info
    chosen = selection.get("models", {}).get(best, {})
    info.update({k: v for k, v in chosen.items() if k != "params"})
    info["vocabulary_fingerprint"] = selection.get("vocabulary_fingerprint")
    saved = models_dir(ws) / str(best) / "recommender.json"
    if saved.exists():
        meta = _read_json(saved)
        info["params"] = meta.get("params", chosen.get("params"))
        info["format_version"] = meta.get("format_version")
    else:
        info["params"] = chosen.get("params")
    return info


def policy_version(ws: Workspace) -> str | None:
    """``version`` of ``models/policy/policy.json``; None while no policy is trained."""
    path = ws.root / POLICY_INFO
    if not path.exists():
        return None
    version = _read_json(path).get("version")
    return None if version is None else str(version)


def llm_label(ws: Workspace) -> str | None:
    """The LLM of the last evaluation: the manifest's ``steps.evaluate.llm``, else reports/evaluation.json."""
    step = ws.read_manifest().get("steps", {}).get("evaluate", {})
    if step.get("llm"):
        return str(step["llm"])
    report = ws.reports_dir / "evaluation.json"
    if report.exists():
        llm = _read_json(report).get("llm")
        return None if llm is None else str(llm)
    return None


def export_manifest_fields(ws: Workspace, table: pa.Table) -> dict[str, Any]:
    """What the export's manifest records about its inputs."""
    from pipelines.export import dataset_fingerprint

    return {
        "input_data_hash": dataset_fingerprint(ws, INPUT_TABLES),
        "input_tables": list(INPUT_TABLES),
        "recommender": recommender_info(ws, table),
        "policy_version": policy_version(ws),
        "llm": llm_label(ws),
        "pmlm_version": metadata.version("pmlm"),
        "workspace": str(ws.root.resolve()),
    }


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
    from pipelines.export import export_table

    ws = Workspace.at(workspace)
    chosen = [f.strip() for f in formats.split(",") if f.strip()]
    target = out if out is not None else ws.root / "export"
    try:
        table = read_prompt_table(ws)
        fields = export_manifest_fields(ws, table)
        result = export_table(
            table,
            target,
            name=PROMPT_TABLE,
            formats=chosen,
            sql_url=sql_url,
            manifest=fields,
        )
    except (MissingTableError, ValueError, RuntimeError) as exc:
        raise _fail(exc) from exc
    ws.record_step(
        "export",
        {
            "rows": result.rows,
            "files": result.files,
            "manifest": str(result.manifest_path),
            "input_data_hash": fields["input_data_hash"],
        },
    )
    recommender = fields["recommender"]
    stale = [r for r in recommender["in_prompt_table"] if r != recommender["selected"]]
    if recommender["selected"] is not None and stale:
        console.print(
            f"[yellow]Note:[/] the prompt table was built with {', '.join(stale)}, but the selected "
            f"recommender is now {recommender['selected']}: rebuild it with `pmlm prompts build`."
        )
    console.print(f"{result.rows} prompts exported:")
    for fmt, where in result.files.items():
        console.print(f"  {fmt:8} {where}", markup=False)
    console.print(f"  manifest {result.manifest_path}", markup=False)
