"""Progress bars: drawn on a terminal with counts, rate and time left; silent off it or when quiet."""

from __future__ import annotations

import io
import logging
import os

import pytest
from rich.console import Console

from flows.progress import OUTPUT, bar, configure_output


@pytest.fixture(autouse=True)
def restore_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(OUTPUT, "quiet", False)
    monkeypatch.setattr(OUTPUT, "log_level", "INFO")
    monkeypatch.setattr(OUTPUT, "console", None)
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "INFO")
    for name in ("pmlm", "prefect", "flows", "pipelines", "recsys", "promptenv"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "level", logger.level)


def run_bar(console: Console) -> str:
    OUTPUT.console = console
    hits = iter(range(100))
    with bar("answers", total=5, status=lambda: f"cache hits {next(hits)}") as tick:
        for done in range(1, 6):
            tick(done, 5)
    out = console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


def test_on_a_terminal_the_bar_shows_counts_time_left_and_the_status() -> None:
    drawn = run_bar(Console(file=io.StringIO(), force_terminal=True, width=120))
    assert "answers" in drawn and "5/5" in drawn and "left" in drawn
    assert "cache hits" in drawn


def test_off_a_terminal_or_when_quiet_nothing_is_drawn() -> None:
    assert run_bar(Console(file=io.StringIO(), force_terminal=False)) == ""
    configure_output(quiet=True)
    assert run_bar(Console(file=io.StringIO(), force_terminal=True)) == ""


def test_the_log_level_reaches_prefect_and_the_packages() -> None:
    configure_output(log_level="warning")
    assert OUTPUT.log_level == "WARNING" and os.environ["PREFECT_LOGGING_LEVEL"] == "WARNING"
    assert logging.getLogger("prefect").level == logging.WARNING
    with pytest.raises(ValueError, match="--log-level must be one of DEBUG, INFO"):
        configure_output(log_level="loud")


def test_every_command_takes_quiet_and_log_level() -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["--quiet", "--log-level", "error", "config", "show"])
    assert shown.exit_code == 0, shown.output
    assert OUTPUT.quiet and OUTPUT.log_level == "ERROR"
    bad = runner.invoke(app, ["--log-level", "loud", "config", "show"])
    assert bad.exit_code == 2 and "--log-level must be one of" in bad.output
