"""OMOP CDM ingest: the Eunomia database, CSV folders, and tables with missing columns."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

from pipelines.ingest import derive, ingest_omop, load_tables
from pipelines.omop import OmopInputError, OmopSchemaError, eunomia_path, read_omop
from pipelines.schemas import TABLES
from pipelines.workspace import Workspace


@pytest.fixture(scope="module")
def eunomia() -> dict[str, pd.DataFrame]:
    return derive(read_omop(eunomia_path()))


def test_eunomia_gives_the_canonical_tables(eunomia: dict[str, pd.DataFrame]) -> None:
    assert len(eunomia["patients"]) == 2694
    assert eunomia["patients"]["patient_id"].str.match(r"^p[0-9a-f]{16}$").all()
    assert set(eunomia["events"]["kind"]) >= {
        "condition",
        "procedure",
        "medication",
        "immunization",
        "observation",
    }
    # concept names, not bare ids, where the concept table has them
    assert not eunomia["events"]["display"].str.startswith("concept ").any()
    idx = eunomia["index_encounters"]
    assert len(idx) > 10_000
    assert set(eunomia["reference_plans"]["plan_source"]) == {"events"}
    assert (eunomia["events"]["recorded_time"] >= eunomia["events"]["time"]).all()


def test_eunomia_workspace_and_summary_say_there_are_no_notes(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    summary = ingest_omop(ws, None)
    assert summary["notes"] == 0
    assert "no clinical notes" in summary["remark"]
    assert "no clinical notes in this database" in summary["ingest"]["notes"]
    assert summary["ingest"]["read"] == summary["ingest"]["kept"] + summary["ingest"]["quarantined"]
    tables = load_tables(ws)
    assert set(tables) == set(TABLES)


def _export_csv(folder: Path, persons: int = 40) -> None:
    """A small CDM as CSV files: the first persons of Eunomia and their rows."""
    con = duckdb.connect(":memory:")
    con.execute("ATTACH ? AS e (READ_ONLY)", [str(eunomia_path())])
    folder.mkdir()
    con.execute(
        f"CREATE TABLE keep AS SELECT PERSON_ID FROM e.person ORDER BY PERSON_ID LIMIT {persons}"
    )
    for table in (
        "person",
        "visit_occurrence",
        "condition_occurrence",
        "procedure_occurrence",
        "drug_exposure",
        "measurement",
        "observation",
    ):
        con.execute(
            f"COPY (SELECT * FROM e.{table} WHERE PERSON_ID IN (SELECT PERSON_ID FROM keep)) TO '{folder / (table + '.csv')}' (HEADER)"
        )
    con.execute(f"COPY (SELECT * FROM e.concept) TO '{folder / 'concept.csv'}' (HEADER)")


def test_csv_folder_matches_the_same_rows_from_duckdb(
    tmp_path: Path, eunomia: dict[str, pd.DataFrame]
) -> None:
    _export_csv(tmp_path / "cdm")
    small = read_omop(tmp_path / "cdm")
    assert len(small.patients) == 40
    assert small.summary.reconciles()
    full_events = eunomia["events"]
    mine = full_events[full_events["patient_id"].isin(small.patients["patient_id"])]
    assert len(small.events) == len(mine)
    assert set(small.events["event_id"]) == set(mine["event_id"])


def test_missing_columns_name_the_table_and_columns(tmp_path: Path) -> None:
    folder = tmp_path / "cdm"
    folder.mkdir()
    (folder / "person.csv").write_text("person_id,year_of_birth\n1,1990\n")
    with pytest.raises(
        OmopSchemaError, match=r"person .*person\.csv.* missing columns \['gender_concept_id'\]"
    ):
        read_omop(folder)
    (folder / "person.csv").write_text("person_id,gender_concept_id,year_of_birth\n1,8532,1990\n")
    (folder / "condition_occurrence.csv").write_text("condition_occurrence_id,person_id\n1,1\n")
    with pytest.raises(
        OmopSchemaError,
        match=r"condition_occurrence .* missing columns \['condition_concept_id', 'condition_start_date'\]",
    ):
        read_omop(folder)


def test_rows_of_absent_persons_are_quarantined(tmp_path: Path) -> None:
    folder = tmp_path / "cdm"
    folder.mkdir()
    (folder / "person.csv").write_text("person_id,gender_concept_id,year_of_birth\n1,8532,1990\n")
    (folder / "condition_occurrence.csv").write_text(
        "condition_occurrence_id,person_id,condition_concept_id,condition_start_date,visit_occurrence_id\n"
        "10,1,4,2020-01-01,\n11,2,4,2020-01-02,\n12,1,4,,\n"
    )
    t = read_omop(folder)
    assert t.summary.reconciles()
    assert len(t.events) == 1
    reasons = dict(zip(t.quarantine["resource_id"], t.quarantine["reason"], strict=True))
    assert reasons == {
        "11": "references absent person",
        "12": "missing or unparsable condition_start_date",
    }
    assert any("no concept table" in n for n in t.summary.notes)


def test_not_a_cdm_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OmopInputError, match="does not exist"):
        read_omop(tmp_path / "missing.duckdb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OmopInputError, match="no CDM"):
        read_omop(tmp_path / "empty")
