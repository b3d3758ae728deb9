"""The pmlm command line, run as a user runs it (Typer's runner; the main job in its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipelines.cohort import MARKER, CohortError
from pipelines.errors import MissingStepError

runner = CliRunner()


def test_default_cohort_and_its_summary(tmp_path: Path) -> None:
    from pipelines.cohort import prepare_default_cohort
    from pipelines.workspace import Workspace

    prepare_default_cohort(Workspace.at(tmp_path))
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
    assert result.exit_code == MissingStepError.exit_code
    assert result.output.startswith("error: ") and "pmlm ingest" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_debug_shows_the_traceback_behind_an_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--debug", "data", "summary", "-w", str(tmp_path)])
    assert isinstance(result.exception, MissingStepError)
    assert "pmlm ingest" in str(result.exception)


@pytest.mark.slow
def test_ingest_fhir_of_a_generated_cohort(generated_cohort: Path, tmp_path: Path) -> None:
    args = ["ingest", "fhir", str(generated_cohort), "-w", str(tmp_path), "--workers", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "= " in result.output and "records read" in result.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["steps"]["ingest"]["summary"]["patients"] == 30
    assert not (tmp_path / ".staging").exists()  # staged parts are removed


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
    assert other.exit_code == CohortError.exit_code
    assert "choose another --out folder" in other.output
    assert json.loads((a / MARKER).read_text())["spec"]["n"] == 2


@pytest.mark.slow(seconds=250)
def test_main_job_end_to_end_with_the_local_llm(tmp_path: Path, prefect_server: str) -> None:
    """`pmlm run` (the README's first command) on a tiny evaluation sample: every artifact is written."""
    import pandas as pd

    small = [
        "--n-obstetric",
        "1",
        "--n-adult",
        "1",
        "--policy-timesteps",
        "64",
        "--policy-encounters",
        "2",
        "--n-calibration",
        "4",
        "--policy",
        "train",  # the short training (the shipped policy: tests/promptenv/test_shipped.py)
    ]
    output = _pmlm(prefect_server, "run", "-w", str(tmp_path), *small)
    prompts = pd.read_parquet(tmp_path / "tables" / "prompts.parquet")
    index = pd.read_parquet(tmp_path / "tables" / "index_encounters.parquet")
    patients = index["patient_id"].nunique()
    assert prompts["method"].value_counts().to_dict() == {
        "pmlm_initial": patients,
        "pmlm": patients,
    }
    initial = prompts[prompts["method"] == "pmlm_initial"]
    assert initial["system"].str.contains("likely to need next").mean() > 0.9
    policy = json.loads((tmp_path / "models" / "policy" / "policy.json").read_text())
    training = policy["training"]
    assert training["timesteps"] == 64 or (training["stopped_by_budget"] and training["episodes"])
    assert policy["trained_with"]["train_encounters"] == 2
    assert policy["trained_with"]["validation_encounters"] == 3  # 1.5 per training encounter
    # the budget stops training; validation episodes already started still finish
    settings = policy["settings"]
    assert (
        policy["training"]["llm_calls"] <= settings["max_llm_calls"] + 2 * settings["n_validation"]
    )
    refined = prompts[prompts["method"] == "pmlm"]["provenance"].map(json.loads)
    assert (refined.map(lambda p: p["policy"]) == policy["version"]).all()
    report = json.loads((tmp_path / "reports" / "evaluation.json").read_text())
    methods = {row["method"] for row in report["table"]}
    assert methods == {"general", "self", "peer", "pmlm_initial", "oracle", "pmlm"}
    exported = json.loads((tmp_path / "export" / "prompts.manifest.json").read_text())
    assert exported["rows"] == 2 * patients and exported["policy_version"] == policy["version"]
    assert 0 < report["calibration"]["threshold"] < 1
    # training and evaluation scored with the one calibration of --n-calibration encounters
    assert report["calibration"]["n_encounters"] == 4
    assert policy["trained_with"]["threshold"] == report["calibration"]["threshold"]
    rows = pd.read_parquet(tmp_path / "reports" / "evaluation_results.parquet")
    assert rows["answer"].str.len().gt(0).all()
    assert "Report:" in output and "Prompt table:" in output
    # the closing sentence says how the policy did against the best fixed prompt
    said = " ".join(output.split())
    assert "1 obstetric test encounter of 1 patient" in said
    assert "Verdict: PMLM cannot be judged on one patient" in said
    assert "Verdict: PMLM " in (tmp_path / "reports" / "evaluation.md").read_text()
    # a second run answers every LLM question from the cache
    sample = ["--n-obstetric", "1", "--n-adult", "1", "--n-calibration", "4"]
    sample += ["--methods", "general,self,peer,pmlm_initial,oracle,pmlm"]
    _pmlm(prefect_server, "evaluate", "-w", str(tmp_path), *sample)
    assert " 0 misses." in (tmp_path / "reports" / "evaluation.md").read_text()


def _pmlm(prefect_api: str, *args: str) -> str:
    """Run the installed ``pmlm`` command in its own process, as a user does; its output."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api}  # the session's server, not a new one
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pmlm"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return output


def test_the_methods_table_says_when_a_method_is_above_the_oracle(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from flows.cli import print_methods

    row = {"subset": "adult", "n": 4, "recall_lo": 0.0, "recall_hi": 1.0, "gap_closed": 0.0}
    rows = [
        row | {"method": "general", "recall": 0.0, "llm_calls_per_patient": 0},
        row | {"method": "peer", "recall": 0.5, "llm_calls_per_patient": 0, "gap_closed": 2.0},
        row | {"method": "oracle", "recall": 0.25, "llm_calls_per_patient": 0, "gap_closed": 1.0},
    ]
    print_methods(rows, "methods")
    out = " ".join(capsys.readouterr().out.split())
    assert "Above the oracle (adult: peer)" in out
    long = row | {"subset": "obstetric", "method": "search_last_16", "n": 120, "recall": 0.2}
    print_methods([long | {"llm_calls_per_patient": 16, "gap_closed": -0.43}], "methods")
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80  # a terminal of 80 columns (rich's default when piped)
    assert any("search_last_16" in ln and "0.200 [0.000, 1.000]" in ln for ln in lines), lines
    print_methods([r for r in rows if r["method"] != "peer"], "methods")
    assert "Above the oracle" not in capsys.readouterr().out
