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


#: Set (to anything) to see the traceback behind an error line.
DEBUG_ENV = "PMLM_DEBUG"


class PMLMGroup(TyperGroup):
    """The command group that turns the packages' errors (`pipelines.errors.PMLMError`) into one
    line on stderr and the error kind's exit code; ``--debug`` (or ``PMLM_DEBUG=1``) keeps the
    traceback."""

    def invoke(self, ctx: Any) -> Any:  # typer.Context (a subclass of its vendored click one)
        try:
            return super().invoke(ctx)
        except PMLMError as exc:
            if ctx.meta.get(DEBUG_ENV) or os.environ.get(DEBUG_ENV):
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
