"""``pmlm llm ask`` and ``pmlm llm ledger`` through Typer's CliRunner, on the real local model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli_llm import llm_app
from pipelines.errors import ConfigError

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "PMLM_PRICES"):
        monkeypatch.delenv(name, raising=False)


def test_ask_prints_the_answer_and_a_stats_line_then_hits_the_cache(tmp_path: Path) -> None:
    args = ["ask", "--backend", "local", "--workspace", str(tmp_path), "--max-tokens", "12"]
    args += ["--run-id", "cli-run", "Name one test done at 28 weeks of pregnancy."]
    first = runner.invoke(llm_app, args)
    assert first.exit_code == 0, first.output
    answer, stats = first.output.rstrip("\n").rsplit("\n", 1)
    assert len(answer.split()) >= 2
    assert stats.startswith("[local:SmolLM2-135M-Instruct.Q4_1] tokens in: ")
    assert "cached: no" in stats and "latency: " in stats and "run: cli-run" in stats
    out_tokens = int(stats.split(" out: ")[1].split(" ")[0])
    assert 0 < out_tokens <= 12

    second = runner.invoke(llm_app, args)
    assert second.exit_code == 0, second.output
    assert "cached: yes" in second.output
    assert second.output.rsplit("\n", 2)[0] == first.output.rsplit("\n", 2)[0]  # same answer

    table = runner.invoke(llm_app, ["ledger", "--workspace", str(tmp_path)])
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if line.startswith("| cli-run "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:9] == [
        "cli-run",
        "local",
        "SmolLM2-135M-Instruct.Q4_1",
        "2",
        "1",
        "0",
        "0",
        "1",
        "50%",
    ]
    assert cells[11] == "0.000000"
    assert "total: 1 runs, 2 calls, 1 backend attempts, cache hit rate 50%" in table.output

    as_json = runner.invoke(llm_app, ["ledger", "--workspace", str(tmp_path), "--json"])
    (summary,) = json.loads(as_json.output)
    assert (summary["calls"], summary["cache_hits"], summary["cache_hit_rate"]) == (2, 1, 0.5)
    assert summary["tokens_out"] == out_tokens


def test_bad_backend_spec_exits_with_the_reason(tmp_path: Path) -> None:
    result = runner.invoke(llm_app, ["ask", "--backend", "gemini:pro", "-w", str(tmp_path), "hi"])
    assert result.exit_code == ConfigError.exit_code
    assert "unknown backend 'gemini'" in result.output
    assert "openai:MODEL@http://HOST:PORT/v1" in result.output


def test_missing_key_for_a_remote_backend_says_which_variable(tmp_path: Path) -> None:
    result = runner.invoke(
        llm_app, ["ask", "-b", "anthropic:claude-sonnet-4-5", "-w", str(tmp_path), "hi"]
    )
    assert result.exit_code == ConfigError.exit_code
    assert "set ANTHROPIC_API_KEY" in result.output


def test_ledger_of_an_empty_workspace(tmp_path: Path) -> None:
    result = runner.invoke(llm_app, ["ledger", "--workspace", str(tmp_path)])
    assert result.exit_code == 0
    assert "no LLM calls recorded" in result.output
    assert not (tmp_path / "cache").exists()  # reading does not create the ledger
