"""``--max-calls 0`` on the command line: no LLM call at all, and one line saying why."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.cli import app
from promptenv.llm.errors import BudgetExceeded

runner = CliRunner()


@pytest.mark.slow
def test_max_calls_zero_makes_no_call(built_workspace: Path, tmp_path: Path, echo_llm: Any) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(built_workspace, ws)
    with echo_llm() as (stub, backend):
        args = ["evaluate", "-w", str(ws), "--backend", backend, "--max-calls", "0"]
        args += ["--methods", "general,peer", "--n-obstetric", "2", "--n-adult", "0"]
        result = runner.invoke(app, args)
        asked = len(stub.requests)
    assert asked == 0
    assert result.exit_code == BudgetExceeded.exit_code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "budget" in lines[0].lower()
    assert "Traceback" not in result.output
