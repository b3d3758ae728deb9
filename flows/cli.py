"""The ``pmlm`` command line: thin wrappers over the packages' plain functions.

Every command reads and writes one workspace folder (``--workspace``, default
``$PMLM_WORKSPACE`` or ``./pmlm-workspace``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.cli_export import export_cmd
from flows.cli_llm import llm_app
from flows.cli_policy import policy_app
from flows.cli_prompts import evaluate_cmd, prompts_app
from flows.cli_recsys import recsys_app
from flows.cli_serve import serve_cmd
from flows.config import config_app
from flows.errors import prefect_defaults, run_app, temporary_server_errors
from flows.options import (
    DEBUG_ENV,
    CdmSchemaOpt,
    FormatOpt,
    LLMParallelOpt,
    PlanHeaderOpt,
    PlansOpt,
    PMLMGroup,
    WorkspaceOpt,
)
from flows.progress import LOG_LEVELS, bar, configure_output
from pipelines.steps import check_source_options, describe_source
from pipelines.workspace import Workspace
from promptenv.encounters import CALIBRATION_ENCOUNTERS
from promptenv.llm.config import use_llm_parallel

app = typer.Typer(
    cls=PMLMGroup,
    help="PMLM: personalized hard prompts for LLMs from patient records.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


_OWN_SCOPE = [""]  # the budget scope the last command of this process made


@app.callback()
def _options(
    ctx: typer.Context,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars (none off a terminal either).")
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(
            help=f"Level of PMLM's and Prefect's log lines: {', '.join(LOG_LEVELS)} "
            "(default: Prefect's own, INFO).",
            show_default=False,
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback behind an error.")
    ] = False,
    wait: Annotated[
        float | None,
        typer.Option(
            "--wait",
            min=0,
            help="Seconds a writing command waits for another's workspace lock "
            "(default: $PMLM_LOCK_WAIT, else 0: fail at once, naming the holder).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Options of every command; the others may also come from PMLM_* variables or pmlm.toml
    (`pmlm config show`). One LLM budget scope per command ($PMLM_BUDGET_SCOPE unless set), so
    its Prefect retries and workers share its --max-calls."""
    import os
    import uuid

    from pipelines.lock import WAIT_ENV
    from promptenv.llm.budget import SCOPE_ENV

    ctx.meta[DEBUG_ENV] = debug
    if wait is not None:
        os.environ[WAIT_ENV] = str(wait)
    if os.environ.get(SCOPE_ENV, _OWN_SCOPE[0]) == _OWN_SCOPE[0]:  # unset, or set by us before
        _OWN_SCOPE[0] = os.environ[SCOPE_ENV] = f"pmlm-command-{uuid.uuid4().hex[:12]}"
    try:
        configure_output(quiet, log_level)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from exc


ingest_app = typer.Typer(
    cls=PMLMGroup,
    help="Read a data source into the workspace's canonical tables.",
    no_args_is_help=True,
)
cohort_app = typer.Typer(
    cls=PMLMGroup,
    help="Generated cohorts (Synthea) and the built-in default cohort.",
    no_args_is_help=True,
)
data_app = typer.Typer(
    cls=PMLMGroup, help="Inspect the workspace's canonical tables.", no_args_is_help=True
)
app.add_typer(ingest_app, name="ingest")
app.add_typer(cohort_app, name="cohort")
app.add_typer(data_app, name="data")
app.add_typer(recsys_app, name="recsys")
app.add_typer(llm_app, name="llm")
app.add_typer(prompts_app, name="prompts")
app.add_typer(policy_app, name="policy")
app.command("evaluate")(evaluate_cmd)
app.command("export")(export_cmd)
app.command("serve")(serve_cmd)
app.add_typer(config_app, name="config")

console = Console()


#: ``reference_plans.plan_source`` → what the summary says.
PLAN_FROM = {"note": "notes", "events": "orders recorded at the visit"}

SplitSeedOpt = Annotated[
    int, typer.Option(help="Seed of the per-patient train/validation/test split.")
]


def print_summary(summary: dict[str, Any], title: str = "Cohort summary") -> None:
    """Print a data summary as a table (the same figures as `pmlm data summary --json`)."""
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("patients", str(summary["patients"]))
    table.add_row("encounters", str(summary["encounters"]))
    table.add_row("events", str(summary["events"]))
    for kind, n in summary["events_by_kind"].items():
        table.add_row(f"  {kind}", str(n))
    table.add_row("notes", str(summary["notes"]))
    table.add_row("reference plans", str(summary["reference_plans"]))
    for where, n in summary.get("plan_sources", {}).items():
        table.add_row(f"  from {PLAN_FROM.get(where, where)}", str(n))
    table.add_row(
        "plan items (distinct)", f"{summary['plan_items']} ({summary['distinct_plan_items']})"
    )
    table.add_row("index encounters", str(summary["index_encounters"]))
    for split, n in summary["index_encounters_by_split"].items():
        pts = summary["patients_with_index_by_split"][split]
        table.add_row(f"  {split}", f"{n} ({pts} patients)")
    table.add_row(
        "obstetric index encounters",
        f"{summary['obstetric_index_encounters']} ({summary['obstetric_share']:.1%})",
    )
    table.add_row("adult index encounters", str(summary["adult_index_encounters"]))
    table.add_row("quarantined records", str(summary["quarantined"]))
    for reason, n in summary["quarantine_reasons"].items():
        table.add_row(f"  {reason}", str(n))
    ingest = summary.get("ingest")
    if ingest:
        table.add_row(
            "records read = kept + quarantined + skipped",
            f"{ingest['read']} = {ingest['kept']} + {ingest['quarantined']} + {ingest['skipped']}",
        )
        if ingest.get("files_quarantined"):
            table.add_row("unreadable files (quarantined)", str(ingest["files_quarantined"]))
    console.print(table)
    if "remark" in summary:
        console.print(f"[yellow]Note:[/] {summary['remark']}")
    for note in (ingest or {}).get("notes", []):
        console.print(f"[yellow]Note:[/] {note}")


def print_methods(rows: list[dict[str, Any]], title: str) -> None:
    """The evaluation's table in terminal width: recall with its interval, gap closed, calls
    (`reports/evaluation.md` has every metric)."""
    import pandas as pd

    from promptenv.evaluate import gap_note

    table = Table(title=title)
    # no cell wraps: the table fits 80 columns with the longest method name and interval
    for column in ("subset", "method", "n"):
        table.add_column(column, justify="right" if column == "n" else "left", no_wrap=True)
    table.add_column("plan-item recall\n[95% CI]", justify="right", no_wrap=True)
    table.add_column("gap\nclosed", justify="right", no_wrap=True)
    table.add_column("LLM calls\n/ patient", justify="right", no_wrap=True)
    for r in rows:
        gap = r.get("gap_closed")
        table.add_row(
            r["subset"],
            r["method"],
            str(r["n"]),
            f"{r['recall']:.3f} [{r['recall_lo']:.3f}, {r['recall_hi']:.3f}]",
            "" if gap is None or gap != gap else f"{gap:.2f}",  # NaN: no oracle or general
            f"{r['llm_calls_per_patient']:.0f}",
        )
    console.print(table)
    console.print(
        "gap closed = (method − general) / (oracle − general); oracle is told the plan (not "
        "deployable); pmlm = the policy's prompts, no LLM call per patient."
    )
    if note := gap_note(pd.DataFrame(rows)):
        console.print(note)


def check_plan_options(plans: str, plan_header: list[str] | None) -> tuple[str, ...] | None:
    """``--plans`` and ``--plan-header`` checked before anything is read (InputError: one line)."""
    from pipelines.ingest import plan_choice
    from pipelines.plans import plan_headers

    plan_choice(plans)
    return plan_headers(plan_header) if plan_header else None


@ingest_app.command("fhir")
def ingest_fhir_cmd(
    path: Annotated[
        Path,
        typer.Argument(
            help="A folder of FHIR R4 bundles (Synthea output or its fhir/, subfolders too), "
            "a Bulk Data export folder (*.ndjson, *.ndjson.gz) or its manifest.json."
        ),
    ],
    workspace: WorkspaceOpt = None,
    split_seed: SplitSeedOpt = 0,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Reader processes (each holds 16 bundles at a time) [default: the number of CPUs].",
        ),
    ] = None,
    fmt: FormatOpt = "auto",
    plans: PlansOpt = "auto",
    plan_header: PlanHeaderOpt = None,
) -> None:
    """Ingest FHIR R4: bundles of any type in a folder tree, or a Bulk Data export (staged:
    a few bundles or one group of patients per process, one table at a time)."""
    from pipelines.fhir import detect_format
    from pipelines.ingest import ingest_fhir

    headers = check_plan_options(plans, plan_header)
    detect_format(path, fmt)  # a bad --format or a missing path: one line, nothing written
    ws = Workspace.at(workspace)
    started = time.perf_counter()
    with bar("ingest: files read") as tick:
        summary = ingest_fhir(
            ws,
            path,
            split_seed=split_seed,
            workers=workers,
            progress=tick,
            fmt=fmt,
            plans=plans,
            plan_headers=headers,
        )
    print_summary(summary, f"FHIR ingest of {path} ({time.perf_counter() - started:.1f} s)")
    console.print(f"Tables written to {ws.tables_dir}")


@ingest_app.command("omop")
def ingest_omop_cmd(
    where: Annotated[
        str | None,
        typer.Argument(
            metavar="PATH_OR_URL",
            help="OMOP CDM: a DuckDB file, a folder of CDM CSV files, or a SQLAlchemy URL "
            "(postgresql://user@host/db) [default: Eunomia].",
            show_default=False,
        ),
    ] = None,
    workspace: WorkspaceOpt = None,
    split_seed: SplitSeedOpt = 0,
    cdm_schema: CdmSchemaOpt = None,
    plans: PlansOpt = "auto",
    plan_header: PlanHeaderOpt = None,
) -> None:
    """Ingest an OMOP CDM 5.3 database (the Eunomia database when none is given)."""
    from pipelines.ingest import ingest_omop
    from pipelines.omop import is_url

    headers = check_plan_options(plans, plan_header)
    location: Path | str | None = where if where is None or is_url(where) else Path(where)
    ws = Workspace.at(workspace)
    started = time.perf_counter()
    summary = ingest_omop(
        ws,
        location,
        split_seed=split_seed,
        cdm_schema=cdm_schema,
        plans=plans,
        plan_headers=headers,
    )
    title = describe_source(f"omop:{where}" if where else "omop").removeprefix("the ")
    print_summary(summary, f"Ingest of {title} ({time.perf_counter() - started:.1f} s)")
    console.print(f"Tables written to {ws.tables_dir}")


@cohort_app.command("generate")
def cohort_generate_cmd(
    n: Annotated[int, typer.Option("--n", min=1, help="Number of women to generate.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (bundles go to OUT/fhir).")],
    seed: Annotated[int, typer.Option("--seed", help="Generator seed.")] = 42,
    threads: Annotated[int, typer.Option(help="Generator threads.")] = 2,
) -> None:
    """Generate a cohort of women aged 18–45 with Synthea (same arguments → identical files)."""
    from pipelines.cohort import CohortSpec, generate_cohort

    started = time.perf_counter()
    fhir_dir, reused = generate_cohort(CohortSpec(n=n, seed=seed), out, threads=threads)
    files = len(list(fhir_dir.glob("*.json")))
    verb = "Reused" if reused else "Generated"
    console.print(f"{verb} {files} bundles in {fhir_dir} ({time.perf_counter() - started:.1f} s)")
    console.print(f"Next: pmlm ingest fhir {fhir_dir}")


@cohort_app.command("snapshot")
def cohort_snapshot_cmd(
    out: Annotated[Path, typer.Argument(help="A folder written by `pmlm cohort generate`.")],
    target: Annotated[
        Path | None,
        typer.Option(help="Where to write the snapshot [default: the package's default cohort]."),
    ] = None,
) -> None:
    """Make a generated cohort the built-in default cohort (maintainers)."""
    from pipelines.cohort import DEFAULT_COHORT_DIR, MARKER, write_snapshot
    from pipelines.fhir import read_fhir_folder

    marker = out / MARKER
    if not marker.exists():
        raise typer.BadParameter(f"{out} has no {MARKER}: make it with `pmlm cohort generate`")
    meta = json.loads(marker.read_text())
    source = read_fhir_folder(out / "fhir")
    spec = meta["spec"]
    provenance = {
        "spec": spec,
        "command": f"pmlm cohort generate --n {spec['n']} --seed {spec['seed']} --out {out.name} "
        f"&& pmlm cohort snapshot {out.name}",
        "synthea_command": meta["command"],
        "bundle_digest": meta["digest"],
        "bundles": meta["files"],
    }
    written = write_snapshot(source, provenance, target or DEFAULT_COHORT_DIR)
    console.print(f"Snapshot of {meta['files']} bundles written to {written}")


@data_app.command("summary")
def data_summary_cmd(
    workspace: WorkspaceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Patients, encounters, events by kind, index encounters by split, obstetric share, quarantine."""
    from pipelines.ingest import load_tables, summarize

    ws = Workspace.at(workspace)
    summary = summarize(load_tables(ws))
    ingest = ws.read_manifest().get("steps", {}).get("ingest", {})
    if "summary" in ingest:
        summary["ingest"] = ingest["summary"].get("ingest")
        if summary["ingest"] is None:
            summary.pop("ingest")
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary, f"Workspace {ws.root}")


@app.command("run")
def run_cmd(
    workspace: WorkspaceOpt = None,
    source: Annotated[
        str,
        typer.Option(
            help="The data: default (the built-in cohort), fhir:PATH (bundles, a Bulk Data "
            "export or its manifest.json; --format), omop (Eunomia), omop:PATH_OR_URL (DuckDB "
            "file, CSV folder, postgresql://... with --cdm-schema), or workspace (the tables "
            "of an earlier `pmlm ingest`). fhir: and omop: take --plans and --plan-header.",
        ),
    ] = "default",
    fmt: FormatOpt = "auto",
    plans: PlansOpt = "auto",
    plan_header: PlanHeaderOpt = None,
    cdm_schema: CdmSchemaOpt = None,
    backend: Annotated[
        str, typer.Option(help="LLM backend spec (local = SmolLM2-135M on this machine).")
    ] = "local",
    n_obstetric: Annotated[
        int, typer.Option(min=1, help="Obstetric test encounters the methods are compared on.")
    ] = 12,
    n_adult: Annotated[
        int, typer.Option(min=0, help="Adult (non-obstetric) test encounters compared too.")
    ] = 4,
    n_calibration: Annotated[
        int,
        typer.Option(
            min=1,
            help="Validation encounters that choose the matching threshold, shared by the "
            "policy training and the evaluation (calibrated once per workspace and LLM; "
            f"fewer than {CALIBRATION_ENCOUNTERS} give a rough threshold: for a quick try only).",
        ),
    ] = CALIBRATION_ENCOUNTERS,
    llm_parallel: LLMParallelOpt = None,
    task_runner: Annotated[
        str,
        typer.Option(
            "--task-runner",
            help="Where the batches of signals and prompts run: threads (2 in this process) "
            "or dask (a local cluster, or the scheduler of --dask-address).",
        ),
    ] = "threads",
    dask_address: Annotated[
        str | None,
        typer.Option(help="A running Dask scheduler (tcp://HOST:8786) for --task-runner dask."),
    ] = None,
    policy_timesteps: Annotated[
        int,
        typer.Option(
            help="PPO steps of the main job's short policy training (`pmlm policy train` trains longer)."
        ),
    ] = 256,
    policy_encounters: Annotated[
        int,
        typer.Option(
            help="Training encounters of that policy training (1.5 times as many validation "
            "encounters; at most 8 LLM calls per training encounter).",
        ),
    ] = 8,
    policy: Annotated[
        str,
        typer.Option(
            "--policy",
            help="Where the policy comes from: auto (the workspace's own policy when it was "
            "trained on this data, recommender and LLM; else the one shipped with the default "
            "cohort when they are those it was trained with; else a short training), train "
            "(always train) or shipped (never train).",
        ),
    ] = "auto",
) -> None:
    """The main job, as Prefect flows: data (the built-in default cohort, or --source), recommenders, prompts, evaluation with the LLM, export."""
    prefect_defaults()  # before Prefect reads its settings
    from flows.pipeline import TASK_RUNNERS, pmlm_pipeline, prefect_destination
    from promptenv.steps import POLICY_SOURCES

    use_llm_parallel(llm_parallel)

    if task_runner not in TASK_RUNNERS:
        raise typer.BadParameter(f"--task-runner must be one of {', '.join(TASK_RUNNERS)}")
    if dask_address and task_runner != "dask":
        raise typer.BadParameter("--dask-address needs --task-runner dask")
    if policy not in POLICY_SOURCES:
        raise typer.BadParameter(f"--policy must be one of {', '.join(POLICY_SOURCES)}")
    described = describe_source(source)  # a bad --source: one line, before Prefect starts
    headers = check_plan_options(plans, plan_header)
    ingest: dict[str, Any] = {
        "fmt": fmt,
        "plans": plans,
        "plan_headers": headers,
        "cdm_schema": cdm_schema,
    }
    check_source_options(source, **ingest)  # an option of another source: one line too
    ws = Workspace.at(workspace)
    started = time.perf_counter()
    console.print(
        f"[bold]PMLM main job[/] on {escape(described)}, workspace {escape(str(ws.root.resolve()))}",
        soft_wrap=True,  # paths stay whole, to copy
    )
    console.print(f"Prefect: {prefect_destination()}", markup=False, soft_wrap=True)
    with temporary_server_errors():
        result = pmlm_pipeline(
            workspace=str(ws.root),
            source=source,
            backend=backend,
            n_obstetric=n_obstetric,
            n_adult=n_adult,
            task_runner=task_runner,
            dask_address=dask_address,
            policy_timesteps=policy_timesteps,
            policy_encounters=policy_encounters,
            ingest=ingest,
            n_calibration=n_calibration,
            policy_source=policy,
        )
    built = result.build
    print_summary(built.summary, described[0].upper() + described[1:])
    prompts = result.refined
    console.print(f"Recommender: {built.recommender}. {result.policy.describe()}")
    console.print(
        f"{prompts.rows} prompts (PMLM initial and PMLM refined by the policy); signals and "
        f"prompts computed for {prompts.recomputed_patients} of {prompts.patients} patients "
        "in this run."
    )
    print_methods(
        result.evaluation.table,
        f"Methods compared with {result.evaluation.llm} on test patients' encounters",
    )
    if result.evaluation.verdict:
        console.print(result.evaluation.verdict, markup=False, soft_wrap=True)
    console.print(f"\nDone in {time.perf_counter() - started:.0f} s.")
    console.print(f"Prompt table: {result.refined.path}", markup=False)
    console.print(f"Report:       {result.evaluation.report}", markup=False)
    console.print(f"Export:       {result.export.manifest}", markup=False)


def main() -> None:
    """Entry point of the ``pmlm`` console script: errors end in one line and their exit code."""
    run_app(app)
