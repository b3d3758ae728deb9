"""Every pmlm command ends on a package error with one line saying what to do, and its exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer

from flows.errors import EXIT_CODES, error_line, run_app
from flows.options import DEBUG_ENV, PMLMGroup
from pipelines.errors import ConfigError, InputError, MissingStepError, PMLMError
from promptenv.llm import BackendSpecError
from promptenv.llm.errors import (
    BudgetExceeded,
    PermanentBackendError,
    RetriesExhausted,
    TransientBackendError,
)
from promptenv.llm.types import Spend

ERRORS: dict[str, PMLMError] = {
    "input": InputError("bad.json is not a Bundle: give a folder of FHIR bundles"),
    "missing": MissingStepError("no fitted recommender: run `pmlm recsys fit`"),
    "config": ConfigError("OPENAI_API_KEY is not set: export it"),
    "spec": BackendSpecError("bad backend spec 'x'"),
    "budget": BudgetExceeded("budget exceeded, call not made", spent=Spend(3), needed=Spend(1)),
    "refused": PermanentBackendError("openai:m: check OPENAI_API_KEY\n(server said: no)"),
    "retries": RetriesExhausted("gave up", last=TransientBackendError("503"), attempts=4),
}


def app_raising() -> typer.Typer:
    app = typer.Typer(cls=PMLMGroup)

    @app.command()
    def fail(kind: str) -> None:
        raise ERRORS[kind]

    @app.command()
    def ok() -> None:
        typer.echo("fine")

    return app


def stub_action(status: int) -> Any:
    """The stub LLM server's scripted response (tests/promptenv/llm_stub_server.py)."""
    import sys

    return sys.modules["llm_stub_server"].Action(status)


def run(app: typer.Typer, *args: str) -> int:
    with pytest.raises(SystemExit) as ended:
        run_app(app, list(args))
    return int(ended.value.code or 0)


@pytest.fixture(autouse=True)
def in_a_folder_without_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PMLM_CONFIG", raising=False)


def test_each_kind_of_error_has_one_line_and_its_own_exit_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = app_raising()
    codes = {}
    for kind, exc in ERRORS.items():
        codes[kind] = run(app, "fail", kind)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert err.strip() == error_line(exc)
        assert codes[kind] == exc.exit_code
    assert codes == {
        "input": 2,
        "missing": 3,
        "config": 4,
        "spec": 4,
        "budget": 7,
        "refused": 8,
        "retries": 6,
    }
    assert set(codes.values()) <= set(EXIT_CODES)
    assert run(app, "ok") == 0


def test_the_line_says_what_to_do_from_the_command_line() -> None:
    assert "raise --max-calls (or max-calls in pmlm.toml)" in error_line(ERRORS["budget"])
    refused = error_line(ERRORS["refused"])
    assert "check --backend" in refused and "\n" not in refused
    assert "run the command again later" in error_line(ERRORS["retries"])
    assert error_line(ERRORS["missing"]) == "error: no fitted recommender: run `pmlm recsys fit`"


def test_debug_shows_the_traceback_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(BudgetExceeded):
        run_app(app_raising(), ["fail", "budget"])


def test_a_real_command_on_an_empty_workspace_says_which_step_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import app

    assert run(app, "data", "summary", "-w", str(tmp_path / "empty")) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pmlm ingest" in err and "Traceback" not in err


def test_a_bad_config_file_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pmlm.toml").write_text("backnd = 'local'\n")
    assert run(app_raising(), "ok") == 4
    assert "unknown key(s) ['backnd']" in capsys.readouterr().err


@pytest.mark.slow
def test_pmlm_evaluate_with_a_spent_budget_or_a_refusing_backend(
    built_workspace: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stub_llm_server: Any,
) -> None:
    import shutil

    from flows.cli import app

    ws = str(shutil.copytree(built_workspace, tmp_path / "ws"))
    stub = stub_llm_server().start()
    monkeypatch.setenv("OPENAI_API_KEY", "stub-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    backend = f"openai:stub-model@{stub.url}/v1"
    small = ["--methods", "general", "--n-obstetric", "1", "--n-adult", "1"]
    try:
        code = run(app, "evaluate", "-w", ws, "--backend", backend, *small, "--max-calls", "1")
        spent = capsys.readouterr().err.strip().splitlines()
        stub.script(*[stub_action(401)] * 8)
        refused = run(app, "evaluate", "-w", ws, "--backend", backend, *small)
        said = capsys.readouterr().err.strip().splitlines()
    finally:
        stub.stop()
    assert code == 7 and spent[-1].startswith("error: budget exceeded"), spent
    assert "raise --max-calls" in spent[-1]
    assert refused == 8 and "check --backend" in said[-1] and "OPENAI_API_KEY" in said[-1], said
