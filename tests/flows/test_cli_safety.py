"""Options of every command that make a run safe to share: --wait and the budget scope."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipelines.lock import WAIT_ENV
from promptenv.llm.budget import SCOPE_ENV

runner = CliRunner()


def test_wait_sets_how_long_writers_queue_for_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WAIT_ENV, raising=False)
    runner.invoke(app, ["--wait", "1.5", "data", "summary", "-w", str(tmp_path)])
    assert os.environ[WAIT_ENV] == "1.5"
    bad = runner.invoke(app, ["--wait", "-1", "data", "summary", "-w", str(tmp_path)])
    assert bad.exit_code == 2


def test_each_command_has_one_budget_scope_unless_one_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SCOPE_ENV, raising=False)
    runner.invoke(app, ["data", "summary", "-w", str(tmp_path)])
    first = os.environ[SCOPE_ENV]
    runner.invoke(app, ["data", "summary", "-w", str(tmp_path)])
    assert first.startswith("pmlm-command-") and os.environ[SCOPE_ENV] != first
    monkeypatch.setenv(SCOPE_ENV, "nightly-job")
    runner.invoke(app, ["data", "summary", "-w", str(tmp_path)])
    assert os.environ[SCOPE_ENV] == "nightly-job"
