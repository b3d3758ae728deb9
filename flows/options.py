"""Options shared by every ``pmlm`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
