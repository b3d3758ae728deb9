"""Every coding of a concept is kept; one preferred system per kind names the event and its items."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from test_fhir import ENCOUNTER_ID, PATIENT_ID, tiny_bundle, write

from pipelines.fhir import read_fhir_folder
from pipelines.ingest import derive, ingest_fhir
from pipelines.workspace import Workspace

ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
NDC = "http://hl7.org/fhir/sid/ndc"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
LOCAL = "urn:oid:1.2.3.4"


def _concept(*codings: tuple[str, str, str]) -> dict[str, Any]:
    return {"coding": [{"system": s, "code": c, "display": d} for s, c, d in codings]}


def coded_bundle() -> dict[str, Any]:
    """`tiny_bundle` plus a condition, a prescription and a vaccine coded in two systems each,
    the preferred system second (an EHR lists its own code first)."""
    bundle = tiny_bundle()
    subject = {"reference": f"urn:uuid:{PATIENT_ID}"}
    enc = {"reference": f"urn:uuid:{ENCOUNTER_ID}"}
    at = "2020-01-01T10:20:00+00:00"
    extra = [
        {
            "resourceType": "Condition",
            "id": "cond-1",
            "subject": subject,
            "encounter": enc,
            "code": _concept(
                (ICD10, "Z34.00", "Normal first pregnancy"),
                (SNOMED, "72892002", "Normal pregnancy"),
            ),
            "onsetDateTime": at,
        },
        {
            "resourceType": "MedicationRequest",
            "id": "med-1",
            "status": "active",
            "subject": subject,
            "encounter": enc,
            "medicationCodeableConcept": _concept(
                (NDC, "0000-1111", "folic acid 1 mg tablet"), (RXNORM, "310410", "folic acid 1 MG")
            ),
            "authoredOn": at,
        },
        {
            "resourceType": "Immunization",
            "id": "imm-1",
            "status": "completed",
            "patient": subject,
            "encounter": enc,
            "vaccineCode": _concept((LOCAL, "FLU-23", "Influenza"), (CVX, "140", "Influenza")),
            "occurrenceDateTime": at,
        },
    ]
    bundle["entry"] += [{"resource": r} for r in extra]
    return bundle


def test_every_coding_is_kept_and_the_preferred_one_names_the_event(tmp_path: Path) -> None:
    write(tmp_path, "a.json", coded_bundle())
    t = read_fhir_folder(tmp_path, workers=1)
    events = t.events.set_index("event_id")
    assert t.quarantine.empty, t.quarantine
    want = {
        "cond-1": (SNOMED, "72892002", [f"{ICD10}|Z34.00", f"{SNOMED}|72892002"]),
        "med-1": (RXNORM, "310410", [f"{NDC}|0000-1111", f"{RXNORM}|310410"]),
        "imm-1": (CVX, "140", [f"{LOCAL}|FLU-23", f"{CVX}|140"]),
    }
    for eid, (system, code, every) in want.items():
        row = events.loc[eid]
        assert (row["code_system"], row["code"]) == (system, code), eid
        assert json.loads(row["codings"]) == every, eid
    assert pd.isna(events.loc["proc-1", "codings"])  # one coding: code_system/code hold it
    # the items of plans built from orders use the preferred system
    items = derive(t, plans_from="events")["plan_items"]
    assert {f"{RXNORM}|310410", f"{CVX}|140"} <= set(items["item_key"])
    assert not items["item_key"].str.startswith((NDC, LOCAL)).any()


def test_the_codings_reach_the_workspace(tmp_path: Path) -> None:
    write(tmp_path / "in", "a.json", coded_bundle())
    ws = Workspace.at(tmp_path / "ws")
    ingest_fhir(ws, tmp_path / "in", workers=1)
    events = ws.read_table("events").set_index("event_id")
    assert json.loads(events.loc["cond-1", "codings"]) == [f"{ICD10}|Z34.00", f"{SNOMED}|72892002"]
