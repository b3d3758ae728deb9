"""The pmlm command line, run as a user runs it (Typer's runner, real files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipelines.cohort import MARKER

runner = CliRunner()


def test_run_prepares_the_default_cohort(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--workspace", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "index encounters" in result.output
    assert (tmp_path / "tables" / "index_encounters.parquet").exists()
    summary = runner.invoke(app, ["data", "summary", "-w", str(tmp_path), "--json"])
    assert summary.exit_code == 0, summary.output
    data = json.loads(summary.output)
    assert data["patients"] >= 100
    assert data["obstetric_index_encounters"] > 0
    assert (
        data["ingest"]["read"]
        == data["ingest"]["kept"] + data["ingest"]["quarantined"] + data["ingest"]["skipped"]
    )


def test_summary_without_data_tells_what_to_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "summary", "-w", str(tmp_path)])
    assert result.exit_code != 0
    assert "pmlm ingest" in str(result.exception)


@pytest.mark.slow
def test_ingest_fhir_of_a_generated_cohort(generated_cohort: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["ingest", "fhir", str(generated_cohort), "-w", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "= " in result.output and "records read" in result.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["steps"]["ingest"]["summary"]["patients"] == 30


def test_ingest_omop_defaults_to_eunomia(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ingest", "omop", "-w", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "no clinical notes" in result.output


@pytest.mark.slow
def test_cohort_generate_is_reproducible_and_reused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        result = runner.invoke(
            app, ["cohort", "generate", "--n", "2", "--seed", "3", "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert "Generated 2 bundles" in result.output
    files_a = sorted((a / "fhir").glob("*.json"))
    files_b = sorted((b / "fhir").glob("*.json"))
    assert [f.name for f in files_a] == [f.name for f in files_b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(files_a, files_b, strict=True))
    again = runner.invoke(app, ["cohort", "generate", "--n", "2", "--seed", "3", "--out", str(a)])
    assert again.exit_code == 0 and "Reused 2 bundles" in again.output
    other = runner.invoke(app, ["cohort", "generate", "--n", "3", "--seed", "3", "--out", str(a)])
    assert other.exit_code != 0
    assert "choose another --out folder" in str(other.exception)
    assert json.loads((a / MARKER).read_text())["spec"]["n"] == 2
