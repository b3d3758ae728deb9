"""Workspace I/O: schema checks, atomic writes, manifest."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from pipelines.workspace import MissingTableError, Workspace


def _patients(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": [f"p{i}" for i in range(n)],
            "birth_date": [pd.Timestamp("1990-01-01").date()] * n,
            "sex": "female",
            "deceased_time": pd.NaT,
            "race": None,
            "ethnicity": None,
            "source": "test",
            "source_file": None,
        }
    )


def test_round_trip_and_readable_permissions(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    path = ws.write_table("patients", _patients(3))
    assert list(ws.read_table("patients")["patient_id"]) == ["p0", "p1", "p2"]
    assert os.stat(path).st_mode & 0o044 == 0o044  # group and others may read the table
    assert not list(ws.tables_dir.glob(".*tmp"))


def test_schema_violations_name_the_table(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    with pytest.raises(ValueError, match=r"table 'patients': missing columns \['sex'\]"):
        ws.write_table("patients", _patients(1).drop(columns="sex"))
    bad = _patients(1).assign(patient_id=[None])
    with pytest.raises(ValueError, match="table 'patients' does not fit its schema"):
        ws.write_table("patients", bad)


def test_a_failed_write_keeps_the_previous_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = Workspace.at(tmp_path)
    ws.write_table("patients", _patients(2))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("pipelines.workspace.pq.write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        ws.write_table("patients", _patients(5))
    monkeypatch.undo()
    assert len(ws.read_table("patients")) == 2
    assert not list(ws.tables_dir.glob(".*tmp"))


def test_missing_table_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(MissingTableError, match="run `pmlm ingest"):
        Workspace.at(tmp_path).read_table("events")


def test_manifest_records_steps(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    ws.record_step("ingest", {"input": "x"})
    ws.record_step("fit", {"model": "y"})
    steps = ws.read_manifest()["steps"]
    assert steps["ingest"]["input"] == "x" and steps["fit"]["model"] == "y"
    assert "finished_at" in steps["fit"]
