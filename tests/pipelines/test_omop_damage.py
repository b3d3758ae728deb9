"""OMOP input as an attacker or a damaged export gives it: hostile file and table
names run no SQL; damaged rows are quarantined one by one with the reason."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from pipelines.omop import OmopSchemaError, read_omop

HOSTILE = "x\" AS SELECT 1; COPY (SELECT 42 AS pwned) TO 'omop_pwned.csv'; CREATE VIEW \"y"
PERSON = "person_id,gender_concept_id,year_of_birth\n1,8532,1990\n2,8532,1985\n"


def cdm(folder: Path, **tables: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "person.csv").write_text(PERSON)
    for name, text in tables.items():
        (folder / f"{name}.csv").write_text(text)
    return folder


def test_hostile_csv_names_run_no_sql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = cdm(tmp_path / "cdm")
    (folder / f"{HOSTILE}.csv").write_text("a\n1\n")
    (folder / "it's.csv").write_text("a\n1\n")
    monkeypatch.chdir(tmp_path)
    t = read_omop(folder)
    assert not list(tmp_path.rglob("omop_pwned.csv"))
    assert len(t.patients) == 2 and t.summary.reconciles()


def test_hostile_duckdb_table_names_run_no_sql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cdm.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE person (person_id INT, gender_concept_id INT, year_of_birth INT)")
    con.execute("INSERT INTO person VALUES (1, 8532, 1990)")
    quoted = '"' + HOSTILE.replace('"', '""') + '"'
    con.execute(f"CREATE TABLE {quoted} (a INT)")
    con.execute('CREATE TABLE "Person"" ; DROP TABLE person; --" (a INT)')
    con.close()
    monkeypatch.chdir(tmp_path)
    t = read_omop(path)  # a person-only DuckDB file, with hostile neighbours
    assert not list(tmp_path.rglob("omop_pwned.csv"))
    assert len(t.patients) == 1 and t.events.empty and t.summary.reconciles()
    check = duckdb.connect(str(path), read_only=True)
    assert check.execute("SELECT count(*) FROM person").fetchone() == (1,)


def test_empty_ids_and_type_errors_are_quarantined_per_row(tmp_path: Path) -> None:
    folder = cdm(
        tmp_path / "cdm",
        visit_occurrence="visit_occurrence_id,person_id,visit_concept_id,visit_start_date\n"
        ",1,9202,2020-01-01\n7,1,9202,2020-01-02\n8,1,9202,not-a-date\n",
        condition_occurrence="condition_occurrence_id,person_id,condition_concept_id,"
        "condition_start_date,visit_occurrence_id\n"
        ",1,4,2020-01-01,7\n10,1,4,2020-01-02,7\n11,one,4,2020-01-02,\n12,1,four,2020-01-02,\n",
        measurement="measurement_id,person_id,measurement_concept_id,measurement_date,"
        "value_as_number,unit_source_value\n"
        "20,1,5,2020-01-02,12.5,mg/dL\n21,1,5,2020-01-02,twelve,mg/dL\n",
        death="person_id,death_date\n2,2024-03-04\n3,2024-03-04\n",
    )
    t = read_omop(folder)
    assert t.summary.reconciles(), t.summary.as_dict()
    reasons = sorted(zip(t.quarantine["resource_type"], t.quarantine["reason"], strict=True))
    assert reasons == [
        ("condition_occurrence", "missing or unparsable condition_concept_id"),
        ("condition_occurrence", "missing or unparsable condition_occurrence_id"),
        ("condition_occurrence", "references absent person"),
        ("death", "references absent person"),
        ("measurement", "unparsable value_as_number"),
        ("visit_occurrence", "missing or unparsable visit_occurrence_id"),
        ("visit_occurrence", "missing or unparsable visit_start_date"),
    ]
    assert t.events["event_id"].tolist() == ["co10", "me20"]
    assert t.events.set_index("event_id").loc["me20", "unit"] == "mg/dL"
    # visit 7, and the day of the measurement that has no visit id
    assert sorted(t.encounters["encounter_id"].str[0]) == ["d", "v"]
    died = t.patients.dropna(subset=["deceased_time"])
    assert len(died) == 1 and str(died["deceased_time"].iloc[0].date()) == "2024-03-04"


def test_a_visit_table_without_datetimes_or_end_dates(tmp_path: Path) -> None:
    folder = cdm(
        tmp_path / "cdm",
        visit_occurrence="visit_occurrence_id,person_id,visit_concept_id,visit_start_date\n"
        "7,1,9201,2020-01-01\n",
    )
    t = read_omop(folder)
    assert t.summary.reconciles() and t.quarantine.empty
    assert (t.encounters["start"] == t.encounters["end"]).all()


def test_an_empty_table_and_a_table_without_its_columns(tmp_path: Path) -> None:
    folder = cdm(tmp_path / "cdm", observation="", drug_exposure="person_id\n1\n")
    with pytest.raises(OmopSchemaError, match=r"drug_exposure .* missing columns"):
        read_omop(folder)
    (folder / "drug_exposure.csv").unlink()
    t = read_omop(folder)
    assert any("table observation is empty" in n for n in t.summary.notes)
