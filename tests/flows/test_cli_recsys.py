"""`pmlm recsys` commands, run through Typer's runner on a small synthetic workspace."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from synthetic_cohort import synthetic_cohort
from typer.testing import CliRunner

from flows.cli_recsys import recsys_app
from pipelines.errors import InputError, MissingStepError
from pipelines.workspace import Workspace

runner = CliRunner()
FAST = ["-m", "popularity", "-m", "repeat_previous", "-m", "item_knn"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recsys-ws")
    ws = Workspace.at(root)
    for name, frame in synthetic_cohort(n_patients=36, seed=5).items():
        ws.write_table(name, frame)
    return root


@pytest.fixture(scope="module")
def fitted(workspace: Path) -> Path:
    result = runner.invoke(recsys_app, ["fit", "-w", str(workspace), *FAST])
    assert result.exit_code == 0, result.output
    assert "best on validation" in result.output
    return workspace


def test_fit_saves_models_and_the_selection(fitted: Path) -> None:
    root = fitted / "models" / "recsys"
    for name in ("popularity", "repeat_previous", "item_knn", "blend"):
        assert (root / name / "recommender.json").exists(), name
    selection = json.loads((root / "selection.json").read_text())
    assert selection["best"] in selection["models"]
    assert selection["models"]["blend"]["params"]["components"][0] == "item_knn"
    manifest = json.loads((fitted / "manifest.json").read_text())
    assert manifest["steps"]["recsys_fit"]["best"] == selection["best"]
    assert (fitted / "reports" / "recsys_tuning.csv").exists()


def test_evaluate_prints_and_writes_the_comparison(fitted: Path) -> None:
    result = runner.invoke(recsys_app, ["evaluate", "-w", str(fitted), "--k", "5"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(fitted / "reports" / "recsys_comparison.csv")
    assert set(table["model"]) == {"popularity", "repeat_previous", "item_knn", "blend"}
    assert set(table["subset"]) == {"all", "obstetric"}
    assert "ndcg@5" in table.columns
    for model in table["model"]:
        assert model in result.output
    assert (fitted / "reports" / "recsys_comparison.md").exists()


def test_explain_shows_self_and_peer_signals(fitted: Path) -> None:
    index = Workspace.at(fitted).read_table("index_encounters")
    patient = index.loc[index["split"] == "test", "patient_id"].iloc[0]
    result = runner.invoke(
        recsys_app, ["explain", patient, "-w", str(fitted), "--peers", "5", "--min-support", "2"]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"patient {patient}" in out
    assert "Self-informed" in out and "because" in out
    assert "Peer-informed" in out and "of 5 peers" in out
    peer_lines = out.split("Peer-informed")[1]
    assert patient not in peer_lines


def test_explain_an_unknown_patient_fails_clearly(fitted: Path) -> None:
    result = runner.invoke(recsys_app, ["explain", "nobody", "-w", str(fitted)])
    assert result.exit_code == InputError.exit_code
    assert "nobody" in result.output


def test_commands_without_tables_say_what_to_run(tmp_path: Path) -> None:
    result = runner.invoke(recsys_app, ["evaluate", "-w", str(tmp_path)])
    assert result.exit_code == MissingStepError.exit_code
    assert "pmlm ingest" in result.output
