"""Pseudonyms from a per-workspace secret, the on-premises crosswalk, file ids."""

from __future__ import annotations

import stat
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from test_fhir import PATIENT_ID, tiny_bundle, write

from pipelines.export import export_table
from pipelines.identity import file_id, lookup, secret_path
from pipelines.ingest import ingest_fhir, ingest_omop
from pipelines.sources import pseudonym
from pipelines.workspace import Workspace


def test_the_secret_is_made_at_the_first_ingest_private_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PMLM_PSEUDONYM_SALT", raising=False)
    write(tmp_path / "in", "Jane_Doe_1.json", tiny_bundle())
    ws = Workspace.at(tmp_path / "ws")
    ingest_fhir(ws, tmp_path / "in", workers=1)
    key = secret_path(ws)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = key.read_text().strip()
    assert len(secret) == 64
    patients = ws.read_table("patients")
    pid = patients["patient_id"].iloc[0]
    assert pid == pseudonym("fhir", PATIENT_ID, secret)
    assert pid != pseudonym("fhir", PATIENT_ID, "pmlm")  # not the constant default
    # the file id, not the file name (which holds the patient's name)
    assert patients["source_file"].tolist() == [file_id("Jane_Doe_1.json", secret)]
    assert "Jane" not in patients.to_string() and PATIENT_ID not in patients.to_string()
    ingest_fhir(ws, tmp_path / "in", workers=1)  # the same secret, the same pseudonym
    assert ws.read_table("patients")["patient_id"].iloc[0] == pid
    monkeypatch.setenv("PMLM_PSEUDONYM_SALT", "hospital-secret")
    other = Workspace.at(tmp_path / "other")
    ingest_fhir(other, tmp_path / "in", workers=1)
    assert other.read_table("patients")["patient_id"].iloc[0] == pseudonym(
        "fhir", PATIENT_ID, "hospital-secret"
    )
    assert not secret_path(other).exists()


def test_apps_find_their_patient_in_the_crosswalk(tmp_path: Path) -> None:
    write(tmp_path / "in", "a.json", tiny_bundle())
    ws = Workspace.at(tmp_path / "ws")
    ingest_fhir(ws, tmp_path / "in", workers=1)
    rows = lookup(ws, PATIENT_ID)
    assert rows.to_dict("records") == [
        {
            "source_system": "fhir",
            "source_id": PATIENT_ID,
            "patient_id": ws.read_table("patients")["patient_id"].iloc[0],
        }
    ]
    assert lookup(ws, "nobody").empty
    assert lookup(ws, PATIENT_ID, "omop").empty
    # an export writes the table it is given and nothing else: no crosswalk, no secret
    table = pa.Table.from_pandas(ws.read_table("patients"), preserve_index=False)
    result = export_table(table, tmp_path / "out", formats=["parquet", "jsonl"])
    exported = {p.name for p in result.out_dir.iterdir()}
    assert not any("crosswalk" in n or "key" in n for n in exported)
    assert PATIENT_ID not in (tmp_path / "out" / "prompts.jsonl").read_text()


def test_omop_persons_are_in_the_crosswalk(tmp_path: Path) -> None:
    folder = tmp_path / "cdm"
    folder.mkdir()
    (folder / "person.csv").write_text("person_id,gender_concept_id,year_of_birth\n17,8532,1990\n")
    ws = Workspace.at(tmp_path / "ws")
    ingest_omop(ws, folder)
    assert lookup(ws, "17")["source_system"].tolist() == ["omop"]


def test_no_crosswalk_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `pmlm ingest"):
        lookup(Workspace.at(tmp_path), "x")


def test_the_default_cohort_has_a_crosswalk_and_no_file_names(tmp_path: Path) -> None:
    """The built-in cohort as the main job prepares it: every patient's FHIR id in the
    private crosswalk, and file ids, not Synthea's ``Given_Family_uuid.json``, in the
    shared tables."""
    from pipelines.cohort import prepare_default_cohort

    ws = Workspace.at(tmp_path / "ws")
    prepare_default_cohort(ws)
    patients = ws.read_table("patients")
    assert patients["source_file"].str.fullmatch(r"f[0-9a-f]{12}").all()
    crosswalk = pd.read_parquet(tmp_path / "ws" / "private" / "crosswalk.parquet")
    assert sorted(crosswalk["patient_id"]) == sorted(patients["patient_id"])
    assert (crosswalk["source_system"] == "fhir").all()
    assert crosswalk["source_id"].str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}").all()
    first = crosswalk.iloc[0]
    assert lookup(ws, first["source_id"], "fhir")["patient_id"].tolist() == [first["patient_id"]]
    assert stat.S_IMODE((tmp_path / "ws" / "private").stat().st_mode) == 0o700
