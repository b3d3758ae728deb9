"""Options shared by every ``pmlm`` command, and the group that reports their errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from pipelines.errors import PMLMError

#: ``--workspace/-w``; ``Workspace.at(None)`` then means ``$PMLM_WORKSPACE`` or ``./pmlm-workspace``.
WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace folder [default: $PMLM_WORKSPACE or ./pmlm-workspace]",
        show_default=False,
    ),
]

#: ``--llm-parallel N``: N answers in flight; the local model generates them in one batch.
LLMParallelOpt = Annotated[
    int | None,
    typer.Option(
        "--llm-parallel",
        min=1,
        help="LLM answers at once: N requests in flight, and the local model decodes N in one "
        "batch (1 = one at a time; an answer may differ in rare tokens with its batch) "
        "[default: $PMLM_LLM_PARALLEL or 8, measured fastest for the local model on 2 cores: "
        "1.30x quiet, 1.05x loaded]",
        show_default=False,
    ),
]

#: ``--format`` of a FHIR input (`pipelines.fhir.detect_format`).
FormatOpt = Annotated[
    str,
    typer.Option("--format", help="auto (detected), bundles, or bulk (a Bulk Data export)."),
]
#: ``--cdm-schema`` of an OMOP database URL.
CdmSchemaOpt = Annotated[
    str | None,
    typer.Option(
        "--cdm-schema", help="The database schema that holds the CDM tables (with a URL)."
    ),
]
PlansOpt = Annotated[
    str,
    typer.Option(
        "--plans",
        help="Where reference plans come from: notes (the plan section of a visit's note), "
        "orders (the orders recorded at the visit), or auto (the note where it has a plan, "
        "else the orders).",
    ),
]
PlanHeaderOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--plan-header",
        help="Title of a note's plan section, repeatable (--plan-header 'Plan' --plan-header "
        "'Plan de tratamiento') [default: 'Assessment and Plan' and 'Plan', as Synthea writes].",
        show_default=False,
    ),
]


#: Set (to anything) to see the traceback behind an error line.
DEBUG_ENV = "PMLM_DEBUG"


class PMLMGroup(TyperGroup):
    """The command group that turns the packages' errors (`pipelines.errors.PMLMError`) into one
    line on stderr and the error kind's exit code; ``--debug`` (or ``PMLM_DEBUG=1``) keeps the
    traceback."""

    def invoke(self, ctx: Any) -> Any:  # typer.Context (a subclass of its vendored click one)
        from flows.errors import error_line

        try:
            return super().invoke(ctx)
        except PMLMError as exc:
            if ctx.meta.get(DEBUG_ENV) or os.environ.get(DEBUG_ENV):
                raise
            typer.echo(error_line(exc), err=True)  # with what to do from the command line
            raise typer.Exit(exc.exit_code) from None
