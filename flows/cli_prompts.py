"""``pmlm prompts ...`` and ``pmlm evaluate``: thin wrappers over `promptenv`."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from flows.options import WorkspaceOpt
from flows.progress import bar
from pipelines.ingest import load_tables
from pipelines.workspace import Workspace, atomic_write_bytes
from promptenv.evaluate import EvalSettings, Evaluation
from promptenv.fragments import PatientSignals
from promptenv.llm import LLMClient
from promptenv.policy import Policy
from promptenv.prompts import METHODS

if TYPE_CHECKING:
    from promptenv.judge import PlanJudge

prompts_app = typer.Typer(
    help="Personalized prompts: build the prompt table, show one patient's.", no_args_is_help=True
)
console = Console()

TABLE_METHODS = tuple(m for m in METHODS if m != "oracle")


def _methods(value: str, allowed: Sequence[str]) -> list[str]:
    methods = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in methods if m not in allowed]
    if bad or not methods:
        raise typer.BadParameter(f"unknown method(s) {bad}; choose from {', '.join(allowed)}")
    return methods


def signal_source(ws: Workspace) -> SignalSource:
    return SignalSource(ws)


class SignalSource:
    """Signals of the workspace's selected recommender, computed on demand."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def __call__(self, encounter_ids: Sequence[str]) -> Mapping[str, PatientSignals]:
        from promptenv.signals import signals_for

        return signals_for(self.workspace, encounter_ids)


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
    from promptenv.prompt_table import build_prompt_table, write_prompt_table

    ws = Workspace.at(workspace)
    methods = _methods(method, TABLE_METHODS)
    if which not in ("latest", "test", "all"):
        raise typer.BadParameter("--which must be latest, test or all")
    table = build_prompt_table(load_tables(ws), methods, signal_source(ws), which)  # type: ignore[arg-type]
    write_prompt_table(ws, table)
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
    from promptenv.prompt_table import build_prompt_table

    ws = Workspace.at(workspace)
    tables = load_tables(ws)
    idx = tables["index_encounters"]
    mine = idx[idx["patient_id"] == patient]
    if mine.empty:
        raise typer.BadParameter(f"patient {patient!r} has no index encounter in {ws.root}")
    if encounter is not None:
        mine = mine[mine["encounter_id"] == encounter]
        if mine.empty:
            raise typer.BadParameter(f"{encounter!r} is not an index encounter of {patient!r}")
    row = mine.sort_values("index_time").tail(1)
    one = {**tables, "index_encounters": row}
    table = build_prompt_table(one, _methods(method, TABLE_METHODS), signal_source(ws), "all")
    for r in table.itertuples(index=False):
        console.rule(
            f"{r.method} · patient {r.patient_id} · index encounter {r.encounter_id} · {r.tokens} tokens"
        )
        console.print(r.system or "(no patient text: the question alone)", markup=False)
        console.print(f"\n[bold]Question:[/] {r.question}")
        console.print("[bold]Provenance:[/]")
        console.print_json(r.provenance)


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
        int, typer.Option(help="Validation encounters that choose the matching threshold.")
    ] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the encounter sample and the bootstrap.")] = 0,
    max_calls: Annotated[
        int | None, typer.Option(help="Hard budget on LLM calls for this run.")
    ] = None,
    llm_parallel: Annotated[
        int, typer.Option(min=1, help="LLM requests in flight at once.")
    ] = EvalSettings.concurrency,
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
    from promptenv.evaluate import EvalSettings, markdown_table
    from promptenv.judge import PlanJudge
    from promptenv.llm import BackendConfigError, BackendSpecError
    from promptenv.search import is_edit_method

    ws = Workspace.at(workspace)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    chosen = [m for m in names if not is_edit_method(m)]
    if not names or any(m not in METHODS for m in chosen):
        raise typer.BadParameter(
            f"unknown method(s) {[m for m in chosen if m not in METHODS]}; choose from "
            f"{', '.join(METHODS)}, pmlm, random_edits, search_N, search_last_N"
        )
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
        concurrency=llm_parallel,
    )

    def hits() -> str:
        return f"cache hits {client.cache_stats.hits}"

    with bar("evaluation: LLM answers", status=hits) as tick:
        result, report = evaluate_workspace(
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
    if grader is not None:
        console.print(f"Judge {grader.label}: {grader.stats.summary()}")
    console.print(f"Written: {report}")


def budgeted_client(backend: str, ws: Workspace, max_calls: int | None) -> LLMClient:
    """The workspace's cached LLM client for ``backend``, with at most ``max_calls`` new calls."""
    from promptenv.llm import Budget

    return LLMClient(
        backend, workspace=ws, budget=Budget(max_calls=max_calls) if max_calls else None
    )


def evaluate_workspace(
    ws: Workspace,
    client: LLMClient,
    names: Sequence[str],
    settings: EvalSettings,
    *,
    progress: Callable[[str], None],
    policy: Policy | None = None,
    judge: PlanJudge | None = None,
    tick: Callable[[int, int], None] | None = None,
) -> tuple[Evaluation, Path]:
    """The methods ``names`` (fixed prompts, pmlm, random_edits, search_N) on the same
    test encounters with ``client``; writes reports/ and returns the result and the
    report's path. ``policy``: the workspace's, for pmlm and random_edits
    (`policy_if_needed`). `pmlm evaluate` and the main job's evaluation both run this.
    """
    from promptenv.evaluate import evaluate_methods
    from promptenv.search import edit_methods, is_edit_method

    result = evaluate_methods(
        client,
        load_tables(ws),
        signal_source(ws),
        [m for m in names if not is_edit_method(m)],
        settings,
        progress=progress,
        edit_methods=edit_methods([m for m in names if is_edit_method(m)], policy),
        judge=judge,
        tick=tick,
    )
    return result, write_evaluation(ws, result, client)


def policy_if_needed(ws: Workspace, names: Sequence[str]) -> Policy | None:
    """The workspace's policy when pmlm or random_edits is asked for (random edits mimic its counts)."""
    from promptenv.policy import load_policy, policy_dir

    if "pmlm" in names:
        return load_policy(policy_dir(ws))
    if "random_edits" in names and (policy_dir(ws) / "policy.json").exists():
        return load_policy(policy_dir(ws))
    return None


def write_evaluation(ws: Workspace, result: Evaluation, client: LLMClient) -> Path:
    """Write the evaluation's rows (parquet), table (Markdown, JSON) to reports/; returns the Markdown path.

    Also writes reports/report.md with plots (`promptenv.report`), with the
    recommender comparison of `pmlm recsys evaluate` when there is one, and prints its path.
    """
    import pandas as pd

    from promptenv.evaluate import (
        EvalSettings,
        markdown_differences,
        markdown_table,
        paired_differences,
    )
    from promptenv.policy import policy_dir
    from promptenv.report import write_report
    from promptenv.report_html import write_html_report

    ws.reports_dir.mkdir(parents=True, exist_ok=True)
    result.results.to_parquet(ws.reports_dir / "evaluation_results.parquet", index=False)
    stats = client.cache_stats
    header = (
        f"# Methods compared\n\nLLM: {result.llm}. Matching threshold {result.calibration['threshold']} "
        f"({result.calibration['chosen_on']}). LLM cache: {stats.hits} hits, {stats.misses} misses.\n\n"
        "Means with bootstrap 95% confidence intervals; gap closed = (method − general) / (oracle − general) "
        "on plan-item recall.\n\n"
    )
    path = ws.reports_dir / "evaluation.md"
    diffs = paired_differences(result.results, EvalSettings())
    paired = (
        "\n\nPaired differences against PMLM initial (same encounters; bootstrap over "
        "encounters; bold: the interval excludes 0):\n\n" + markdown_differences(diffs)
        if len(diffs)
        else ""
    )
    atomic_write_bytes(path, (header + markdown_table(result.table) + paired + "\n").encode())
    atomic_write_bytes(
        ws.reports_dir / "evaluation.json",
        json.dumps(
            {
                "llm": result.llm,
                "calibration": result.calibration,
                "table": result.table.to_dict(orient="records"),
            },
            indent=2,
            default=float,
        ).encode(),
    )
    recsys_csv = ws.reports_dir / "recsys_comparison.csv"
    recsys = pd.read_csv(recsys_csv) if recsys_csv.exists() else None
    report = write_report(ws.reports_dir, result, recsys, (stats.hits, stats.misses))
    console.print(f"Report with plots: {report}")
    info = policy_dir(ws) / "policy.json"
    policy = json.loads(info.read_text()) if info.exists() else None
    html = write_html_report(ws.reports_dir, result, recsys, policy, (stats.hits, stats.misses))
    console.print(f"Report to open in a browser: {html}")
    return path
