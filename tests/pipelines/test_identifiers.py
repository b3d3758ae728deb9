"""The workspace's deny-list: what a FHIR Patient gives, the file's permissions, the table's part."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pandas as pd
import pytest

from pipelines.identifiers import (
    fhir_identifiers,
    identifiers_path,
    load_identifiers,
    write_identifiers,
)
from pipelines.sources import pseudonym
from pipelines.workspace import Workspace

PATIENT = {
    "resourceType": "Patient",
    "id": "0a1b2c3d-1111-2222-3333-444455556666",
    "name": [
        {"use": "official", "prefix": ["Mrs."], "given": ["Adele615"], "family": "Schinner682"}
    ],
    "telecom": [{"system": "phone", "value": "555-201-3344"}, {"system": "email", "value": 7}],
    "address": [
        {
            "line": ["12 Oak Street", "Apt 3"],
            "city": "Springfield",
            "state": "MA",
            "postalCode": "01103",
        }
    ],
    "identifier": [{"type": {"text": "MRN"}, "value": "MRN-77120"}, {"value": "999-45-6789"}],
    "contact": [
        {"name": {"given": ["Otto"], "family": "Schinner"}, "telecom": [{"value": "555-0101"}]}
    ],
    "birthDate": "1991-02-03",
}


def bundle(path: Path, *resources: object) -> Path:
    entries = [{"resource": r} for r in resources]
    path.write_text(json.dumps({"resourceType": "Bundle", "entry": entries}))
    return path


def test_a_patient_gives_names_addresses_telecom_ids_and_birth_date(tmp_path: Path) -> None:
    good = bundle(tmp_path / "a.json", PATIENT, {"resourceType": "Encounter", "id": "e1"})
    broken = tmp_path / "b.json"
    broken.write_bytes(b"{not json")
    found = fhir_identifiers([good, broken], salt="s")
    pid = pseudonym("fhir", PATIENT["id"], "s")  # type: ignore[arg-type]
    assert list(found) == [pid]
    entry = found[pid]
    assert {"Adele615", "Schinner682", "Adele615 Schinner682", "Otto", "Schinner"} <= set(
        entry["names"]
    )
    assert entry["addresses"] == ["12 Oak Street", "Apt 3", "Springfield", "01103"]
    assert entry["other"] == [
        "555-201-3344",
        "555-0101",
    ]  # a telecom value that is no string is left
    assert entry["ids"] == ["MRN-77120", "999-45-6789", PATIENT["id"], pid]
    assert entry["dates"] == ["1991-02-03"]


def test_the_file_is_private_and_merged_with_the_patients_table(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    patients = pd.DataFrame(
        {
            "patient_id": ["p1", "p2"],
            "birth_date": [pd.Timestamp("1990-01-02").date(), None],
            "sex": "female",
            "deceased_time": pd.NaT,
            "race": None,
            "ethnicity": None,
            "source": "fhir",
            "source_file": ["Donya_Schumm_297cb658.json", "bundle.json"],
        }
    )
    ws.write_table("patients", patients)
    path = write_identifiers(ws, {"p1": {"names": ["Donya Schumm"], "other": ["555-201-3344"]}})
    assert path == identifiers_path(ws)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    found = load_identifiers(ws)
    assert found["p1"]["names"] == ["Donya", "Schumm", "Donya Schumm"]
    assert found["p1"]["ids"] == ["p1", "297cb658"] and found["p1"]["dates"] == ["1990-01-02"]
    assert found["p1"]["other"] == ["555-201-3344"]
    assert found["p2"] == {"names": [], "ids": ["p2"], "dates": [], "addresses": [], "other": []}


def test_a_damaged_file_says_how_to_rebuild_it(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    identifiers_path(ws).parent.mkdir()
    identifiers_path(ws).write_text("[1, 2]")
    with pytest.raises(
        ValueError, match=r"identifiers.json is not a deny-list file .*`pmlm ingest"
    ):
        load_identifiers(ws)


def test_a_patient_read_twice_keeps_the_values_of_both(tmp_path: Path) -> None:
    """A conflicting duplicate Patient: the deny-list keeps both names (reference and
    reader alike), and the reader's match the reference's."""
    from pipelines.fhir import read_fhir_folder

    first = {"resourceType": "Patient", "id": "p1", "name": [{"given": ["Ana"], "family": "Roe"}]}
    second = {**first, "name": [{"given": ["Eva"], "family": "Poe"}], "birthDate": "1990-01-01"}
    paths = []
    for i, patient in enumerate((first, second)):
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient}]}
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(bundle))
    reference = fhir_identifiers(paths, salt="s")
    (entry,) = reference.values()
    assert {"Ana", "Roe", "Eva", "Poe", "Ana Roe", "Eva Poe"} <= set(entry["names"])
    assert entry["dates"] == ["1990-01-01"]
    assert read_fhir_folder(tmp_path, salt="s", workers=1).identifiers == reference
