"""``pmlm prompts ...`` and ``pmlm evaluate``: thin wrappers over `promptenv.steps`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from flows.options import LLMParallelOpt, PMLMGroup, WorkspaceOpt
from flows.progress import bar
from pipelines.workspace import Workspace
from promptenv.encounters import CALIBRATION_ENCOUNTERS
from promptenv.llm.config import use_llm_parallel
from promptenv.prompts import METHODS
from promptenv.steps import TABLE_METHODS

prompts_app = typer.Typer(
    cls=PMLMGroup,
    help="Personalized prompts: build the prompt table, show one patient's.",
    no_args_is_help=True,
)
console = Console()


@prompts_app.command("build")
def build_cmd(
    workspace: WorkspaceOpt = None,
    method: Annotated[
        str, typer.Option("--method", help=f"Comma-separated methods: {', '.join(TABLE_METHODS)}.")
    ] = "pmlm_initial",
    which: Annotated[
        str,
        typer.Option(help="latest (each patient's current prompt), test, or all index encounters."),
    ] = "latest",
) -> None:
    """Write the prompt table (tables/prompts.parquet) for the chosen encounters and methods."""
    from promptenv.steps import build_workspace_prompts, parse_methods

    ws = Workspace.at(workspace)
    methods = parse_methods(method)
    table = build_workspace_prompts(ws, methods, which)
    console.print(
        f"{len(table)} prompts ({', '.join(methods)}) for {table['patient_id'].nunique()} patients "
        f"→ {ws.table_path('prompts')}; mean {table['tokens'].mean():.0f} tokens"
    )


@prompts_app.command("show")
def show_cmd(
    patient: Annotated[str, typer.Argument(help="Patient pseudonym (patients.patient_id).")],
    workspace: WorkspaceOpt = None,
    method: Annotated[str, typer.Option(help="Method whose prompt to show.")] = "pmlm_initial",
    encounter: Annotated[
        str | None, typer.Option(help="Index encounter (default: her latest).")
    ] = None,
) -> None:
    """Print one patient's prompt with its provenance."""
    from promptenv.steps import parse_methods, patient_prompts

    ws = Workspace.at(workspace)
    table = patient_prompts(ws, patient, parse_methods(method), encounter)
    for r in table.itertuples(index=False):
        console.rule(
            f"{r.method} · patient {r.patient_id} · index encounter {r.encounter_id} · {r.tokens} tokens"
        )
        console.print(r.system or "(no patient text: the question alone)", markup=False)
        console.print(f"\n[bold]Question:[/] {r.question}")
        console.print("[bold]Provenance:[/]")
        console.print_json(r.provenance)


@prompts_app.command("lookup")
def lookup_cmd(
    source_id: Annotated[
        str,
        typer.Argument(help="The patient's id in the source (FHIR Patient.id, OMOP person_id)."),
    ],
    workspace: WorkspaceOpt = None,
    source_system: Annotated[
        str | None,
        typer.Option(help="Only this source system (fhir, omop) [default: any]."),
    ] = None,
) -> None:
    """Find a source patient's pseudonym(s) and prompt rows (the crosswalk stays on premises)."""
    from pipelines.identity import find_patient

    ws = Workspace.at(workspace)
    found = find_patient(ws, source_id, source_system)
    for r in found.crosswalk.itertuples(index=False):
        typer.echo(f"{r.source_system} {r.source_id} -> {r.patient_id}")
    if found.prompts is None:
        typer.echo(
            f"No prompt table yet ({found.prompt_table}): run `pmlm run` or `pmlm prompts build`."
        )
    else:
        typer.echo(f"{len(found.prompts)} prompt rows in {found.prompt_table}:")
        for p in found.prompts.itertuples(index=False):
            typer.echo(
                f"  {p.patient_id}  {p.method:<14} encounter {p.encounter_id}  "
                f"{p.index_time:%Y-%m-%d %H:%M}  {p.tokens} tokens"
            )
    if found.export is not None:
        typer.echo(f"Exported table: {found.export} (join on patient_id)")
    typer.echo("The text: pmlm prompts show PSEUDONYM --method METHOD")


def evaluate_cmd(
    workspace: WorkspaceOpt = None,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help=f"Comma-separated: {', '.join(METHODS)}; with a trained policy also pmlm, "
            "random_edits, search_N (per-patient search with N LLM calls scored against the plan it "
            "is evaluated on: optimistic) and search_last_N (scored against the last plan known at "
            "the index time: deployable), e.g. search_16,search_last_16.",
        ),
    ] = ",".join(METHODS),
    backend: Annotated[
        str,
        typer.Option(help="LLM backend spec: local, openai:MODEL[@URL], anthropic:MODEL[@URL]."),
    ] = "local",
    n_obstetric: Annotated[int, typer.Option(help="Obstetric test encounters.")] = 40,
    n_adult: Annotated[int, typer.Option(help="Adult test encounters.")] = 40,
    n_calibration: Annotated[
        int,
        typer.Option(
            help="Validation encounters that choose the matching threshold (calibrated once "
            "per workspace and LLM, again when this changes)."
        ),
    ] = CALIBRATION_ENCOUNTERS,
    seed: Annotated[int, typer.Option(help="Seed of the encounter sample and the bootstrap.")] = 0,
    max_calls: Annotated[
        int | None, typer.Option(help="Hard budget on LLM calls for this run.")
    ] = None,
    llm_parallel: LLMParallelOpt = None,
    judge: Annotated[
        str | None,
        typer.Option(
            "--judge",
            metavar="SPEC",
            help="Also grade every answer with this LLM as a judge (openai:MODEL[@URL] or "
            "anthropic:MODEL[@URL]; its calls have their own --max-calls budget): adds a "
            "judge (0-1) column.",
        ),
    ] = None,
    allow_local_judge: Annotated[
        bool,
        typer.Option(
            "--allow-local-judge",
            help="Accept a local --judge model (the default 135M one is not a credible judge).",
        ),
    ] = False,
) -> None:
    """Compare methods on the same test encounters with the same LLM; write the table to reports/."""
    from promptenv.evaluate import EvalSettings, gap_note, markdown_table
    from promptenv.judge import PlanJudge
    from promptenv.llm import BackendConfigError, BackendSpecError
    from promptenv.steps import (
        budgeted_client,
        check_eval_methods,
        evaluate_workspace,
        policy_if_needed,
    )

    use_llm_parallel(llm_parallel)
    ws = Workspace.at(workspace)
    names = check_eval_methods(methods.split(","))
    policy = policy_if_needed(ws, names)  # before any LLM: a missing policy fails fast
    client = budgeted_client(backend, ws, max_calls)
    grader = None
    if judge is not None:
        try:
            grader = PlanJudge(budgeted_client(judge, ws, max_calls), allow_local=allow_local_judge)
        except (BackendConfigError, BackendSpecError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--judge") from exc
    settings = EvalSettings(
        n_obstetric=n_obstetric,
        n_adult=n_adult,
        n_calibration=n_calibration,
        seed=seed,
        concurrency=llm_parallel or 2,  # two requests in flight (a remote LLM answers both)
    )

    def hits() -> str:
        return f"cache hits {client.cache_stats.hits}"

    with bar("evaluation: LLM answers", status=hits) as tick:
        result, files = evaluate_workspace(
            ws,
            client,
            names,
            settings,
            progress=console.print,
            policy=policy,
            judge=grader,
            tick=tick,
        )
    console.print(markdown_table(result.table), markup=False)
    if note := gap_note(result.table):
        console.print(note, markup=False)
    if files.verdict:
        console.print(f"\n{files.verdict}", markup=False, soft_wrap=True)
    if grader is not None:
        console.print(f"Judge {grader.label}: {grader.stats.summary()}")
    console.print(f"Report with plots: {files.report}", markup=False)
    console.print(f"Report to open in a browser: {files.html}", markup=False)
    console.print(f"Written: {files.table}", markup=False)
