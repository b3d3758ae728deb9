"""``pmlm recsys``: fit, evaluate and explain the recommenders of a workspace.

Thin wrappers over :mod:`recsys.steps`; mounted by ``flows.cli`` as
``app.add_typer(recsys_app, name="recsys")``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from flows.options import PMLMGroup, WorkspaceOpt
from pipelines.workspace import Workspace

recsys_app = typer.Typer(
    cls=PMLMGroup,
    help="Recommenders: fit (tuned on validation patients), evaluate on test patients, "
    "explain one patient's self and peer signals.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

KOpt = Annotated[int, typer.Option("--k", help="Cut-off of the ranking metrics.", min=1)]


@recsys_app.command()
def fit(
    workspace: WorkspaceOpt = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Model to fit (repeatable): popularity, repeat_previous, lightfm, als, bpr, "
            "item_knn, blend. Default: all of them and their blend.",
        ),
    ] = None,
    k: KOpt = 10,
    select_on: Annotated[
        str, typer.Option(help="Validation subset to maximize nDCG@k on: all, obstetric, adult.")
    ] = "all",
) -> None:
    """Tune each model on validation patients, fit it on train patients, save it."""
    from recsys.evaluate import to_markdown
    from recsys.steps import fit_models

    summary = fit_models(
        Workspace.at(workspace), model, k=k, select_on=select_on, progress=typer.echo
    )
    typer.echo(to_markdown(summary.validation))
    typer.echo(f"best on validation: {summary.best}")


@recsys_app.command()
def evaluate(workspace: WorkspaceOpt = None, k: KOpt = 10) -> None:
    """Compare every saved model on test patients; print and save the table."""
    from recsys.evaluate import to_markdown
    from recsys.steps import evaluate_models

    ws = Workspace.at(workspace)
    table = evaluate_models(ws, k=k, progress=typer.echo)
    typer.echo(to_markdown(table))
    typer.echo(f"written: {ws.reports_dir / 'recsys_comparison.csv'} (and .md)")


@recsys_app.command()
def explain(
    patient: Annotated[str, typer.Argument(help="patient_id")],
    workspace: WorkspaceOpt = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Saved model [default: best on validation]")
    ] = None,
    encounter: Annotated[
        str | None, typer.Option(help="Index encounter id [default: the patient's latest]")
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Items to list.", min=1)] = 10,
    peers: Annotated[int, typer.Option(help="Similar training patients to find.", min=1)] = 20,
    min_support: Annotated[
        int, typer.Option(help="Distinct peers needed before a peer statement is made.", min=1)
    ] = 5,
) -> None:
    """One patient's self and peer signals, with the reasons behind each."""
    from recsys.steps import explain_patient

    explanation = explain_patient(
        patient,
        Workspace.at(workspace),
        model_name=model,
        encounter_id=encounter,
        k=k,
        n_peers=peers,
        min_support=min_support,
    )
    typer.echo(explanation.render())
