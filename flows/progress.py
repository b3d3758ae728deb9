"""Progress bars on the terminal (``rich.progress``) for the long steps, and the log level.

The packages' steps take a plain callback, `Tick`: ``tick(done, total)`` after each
unit of work (a file read, a recommender setting tried, a batch of signals, an
LLM answer, a policy step), the shape ``LLMClient.generate_many`` already calls.
`bar` gives one that draws a bar with the rate, the time elapsed and the time
left, plus an optional status (e.g. the LLM cache's hits). Nothing is drawn when
the output is not a terminal (logs, CI, a pipe) or with ``pmlm --quiet``.

``pmlm --log-level LEVEL`` sets the level of PMLM's and Prefect's loggers
(``PREFECT_LOGGING_LEVEL`` for the flows' run loggers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from recsys.type_aliases import Tick  # the packages' alias (`tick(done, total)`)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class Output:
    """How the command line reports: bars or not, and at which log level."""

    quiet: bool = False
    log_level: str = "INFO"
    console: Console | None = None

    def show_bars(self) -> bool:
        return not self.quiet and self.terminal().is_terminal

    def terminal(self) -> Console:
        if self.console is None:
            self.console = Console(stderr=True)
        return self.console


OUTPUT = Output()


def configure_output(quiet: bool = False, log_level: str | None = None) -> None:
    """Set the bars and log level of this process (``pmlm --quiet --log-level``).

    ``log_level`` None leaves the levels as they are (Prefect's own settings).
    Raises ValueError for a level not in `LOG_LEVELS`.
    """
    OUTPUT.quiet = quiet
    if log_level is None:
        return
    level = log_level.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
    OUTPUT.log_level = level
    # the flows' run loggers read this when Prefect loads its settings (later in this process)
    os.environ["PREFECT_LOGGING_LEVEL"] = level
    for name in ("pmlm", "prefect", "flows", "pipelines", "recsys", "promptenv"):
        logging.getLogger(name).setLevel(level)


def _no_tick(done: int, total: int) -> None:
    return None


@contextmanager
def bar(
    what: str, total: int | None = None, status: Callable[[], str] | None = None
) -> Iterator[Tick]:
    """A bar for ``what`` while the block runs; yields the `Tick` to hand to the step.

    ``status()`` (e.g. ``lambda: f"cache hits {client.cache_stats.hits}"``) is shown
    after the counts and read at each tick. Off the terminal or when quiet, the
    tick does nothing.
    """
    if not OUTPUT.show_bars():
        yield _no_tick
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("elapsed,"),
        TimeRemainingColumn(),
        TextColumn("left"),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=OUTPUT.terminal(), transient=False) as progress:
        task = progress.add_task(what, total=total, rate="", status=status() if status else "")

        def tick(done: int, total_now: int) -> None:
            speed = progress.tasks[0].speed
            progress.update(
                task,
                completed=done,
                total=total_now,
                rate=f"{speed:.1f}/s" if speed else "",
                status=status() if status else "",
            )

        yield tick


__all__ = ["LOG_LEVELS", "OUTPUT", "Tick", "bar", "configure_output"]
