"""FHIR R4 ingest: real generated bundles, bad input, reconciliation, determinism."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.fhir import FhirInputError, read_fhir_folder
from pipelines.identity import file_id
from pipelines.ingest import derive, ingest_fhir
from pipelines.schemas import PATIENTS
from pipelines.workspace import Workspace

PATIENT_ID = "11111111-1111-1111-1111-111111111111"
ENCOUNTER_ID = "22222222-2222-2222-2222-222222222222"


def note(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def tiny_bundle() -> dict[str, Any]:
    """A valid bundle: one patient, one encounter, a procedure, a note with a plan."""
    enc_ref = {"reference": f"urn:uuid:{ENCOUNTER_ID}"}
    subject = {"reference": f"urn:uuid:{PATIENT_ID}"}
    resources = [
        {
            "resourceType": "Patient",
            "id": PATIENT_ID,
            "gender": "female",
            "birthDate": "1990-02-03",
        },
        {
            "resourceType": "Encounter",
            "id": ENCOUNTER_ID,
            "subject": subject,
            "class": {"code": "AMB"},
            "type": [
                {
                    "coding": [
                        {
                            "system": "http://snomed.info/sct",
                            "code": "424441002",
                            "display": "Prenatal initial visit",
                        }
                    ]
                }
            ],
            "period": {"start": "2020-01-01T10:00:00+00:00", "end": "2020-01-01T11:00:00+00:00"},
        },
        {
            "resourceType": "Procedure",
            "id": "proc-1",
            "subject": subject,
            "encounter": enc_ref,
            "code": {
                "coding": [
                    {
                        "system": "http://snomed.info/sct",
                        "code": "252160004",
                        "display": "Standard pregnancy test (procedure)",
                    }
                ]
            },
            "performedDateTime": "2020-01-01T10:10:00+00:00",
        },
        {
            "resourceType": "DocumentReference",
            "id": "note-1",
            "subject": subject,
            "date": "2020-01-01T10:00:00+00:00",
            "context": {"encounter": [enc_ref]},
            "content": [
                {
                    "attachment": {
                        "data": note(
                            "# Assessment and Plan\n\n## Plan\nThe following procedures were conducted:\n- standard pregnancy test (procedure)\n"
                        )
                    }
                }
            ],
        },
        {"resourceType": "Claim", "id": "claim-1"},
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": r} for r in resources],
    }


def write(folder: Path, name: str, content: bytes | dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def test_tiny_bundle_reads_every_resource_type(tmp_path: Path) -> None:
    write(tmp_path, "a.json", tiny_bundle())
    t = read_fhir_folder(tmp_path)
    s = t.summary
    assert (s.read, s.kept, s.quarantined, s.skipped) == (5, 4, 0, 1)
    assert s.skipped_by_type == {"Claim": 1}
    assert t.patients["patient_id"].str.match(r"^p[0-9a-f]{16}$").all()
    # the source id never appears in the canonical columns (only in the crosswalk's)
    assert PATIENT_ID not in t.patients[PATIENTS.names].to_string()
    assert t.events.iloc[0]["code"] == "252160004"
    assert "standard pregnancy test" in t.notes.iloc[0]["text"]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b["entry"][2]["resource"].pop("code"), "missing code"),
        (
            lambda b: b["entry"][2]["resource"].update(performedDateTime="01/01/2020"),
            "unparsable performedDateTime",
        ),
        (
            lambda b: b["entry"][2]["resource"].update(encounter={"reference": "urn:uuid:nope"}),
            "references absent Encounter nope",
        ),
        (
            lambda b: b["entry"][2]["resource"].update(subject={"reference": "Patient/ghost"}),
            "references absent Patient ghost",
        ),
        (
            lambda b: b["entry"].append(
                {"resource": {**b["entry"][2]["resource"], "performedDateTime": "2020-01-01"}}
            ),
            "conflicting duplicate Procedure id: differs from the occurrence kept, read from 'bad.json'",
        ),
        (
            lambda b: b["entry"][3]["resource"]["content"][0]["attachment"].update(data="%%%"),
            "not base64",
        ),
        (lambda b: b["entry"][1]["resource"].pop("period"), "missing period"),
        (lambda b: b["entry"][2]["resource"].pop("id"), "missing id"),
    ],
)
def test_bad_resources_are_quarantined_with_reason(
    tmp_path: Path, mutate: Any, reason: str
) -> None:
    bundle = tiny_bundle()
    mutate(bundle)
    write(tmp_path, "bad.json", bundle)
    t = read_fhir_folder(tmp_path)
    assert t.summary.reconciles()
    assert t.summary.quarantined >= 1
    row = t.quarantine.iloc[0]
    assert row["source_file"] == "bad.json"
    assert reason in " | ".join(t.quarantine["reason"])


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"resourceType": "Bundle", "entry": [', "malformed JSON"),
        (b'{"resourceType": "Patient", "id": "x"}', "not a FHIR Bundle (resourceType 'Patient')"),
        (b"[1, 2]", "not a FHIR Bundle"),
        (
            '{"resourceType": "Bundle", "note": "caf\xe9"}'.encode("latin-1"),
            "not UTF-8: invalid byte at offset",
        ),
    ],
)
def test_unreadable_files_are_quarantined_not_fatal(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    write(tmp_path, "a_good.json", tiny_bundle())
    write(tmp_path, "b_bad.json", content)
    t = read_fhir_folder(tmp_path)
    assert t.summary.files_read == 1 and t.summary.files_quarantined == 1
    assert t.summary.reconciles()
    assert len(t.patients) == 1  # the good file is still read
    bad = t.quarantine[t.quarantine["source_file"] == "b_bad.json"]
    assert reason in bad.iloc[0]["reason"]


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FhirInputError, match="does not exist"):
        read_fhir_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FhirInputError, match=r"no \*\.json FHIR bundles"):
        read_fhir_folder(tmp_path / "empty")


def test_identical_repeats_across_files_are_merged_and_counted(tmp_path: Path) -> None:
    # 20 copies force the multi-process path; every copy after the first is a repeat
    for i in range(20):
        write(tmp_path / f"sub{i % 3}", f"copy{i:02d}.json", tiny_bundle())
    t = read_fhir_folder(tmp_path, workers=2)
    assert t.summary.reconciles()
    assert len(t.patients) == 1 and len(t.encounters) == 1 and len(t.events) == 1
    assert t.summary.kept == 4
    assert t.summary.quarantined == 0 and t.quarantine.empty
    assert t.summary.skipped_by_reason == {"identical repeat": 19 * 4}
    assert sum(t.summary.kept_by_type.values()) == t.summary.kept
    assert t.patients["source_file"].tolist() == [file_id("sub0/copy00.json")]


def test_conflicting_repeats_across_files_name_both_files(tmp_path: Path) -> None:
    for i in range(20):
        bundle = tiny_bundle()
        if i == 17:  # another date for the same Encounter id
            bundle["entry"][1]["resource"]["period"]["start"] = "2020-01-01T09:00:00+00:00"
        write(tmp_path, f"copy{i:02d}.json", bundle)
    t = read_fhir_folder(tmp_path, workers=2)
    assert t.summary.reconciles()
    assert t.summary.quarantined == 1
    row = t.quarantine.iloc[0]
    assert (row["source_file"], row["resource_type"]) == ("copy17.json", "Encounter")
    assert row["reason"].endswith("read from 'copy00.json'")
    assert t.encounters["start"].dt.hour.tolist() == [10]


# ---------------------------------------------------------------- real generated cohort


@pytest.mark.slow
def test_generated_cohort_plans_become_index_encounters(generated_cohort: Path) -> None:
    """Acceptance: ≥ 90% of encounters whose next encounter's note has a plan are index encounters."""
    source = read_fhir_folder(generated_cohort)
    assert source.summary.reconciles()
    assert source.summary.files_read == 30
    tables = derive(source)
    enc = tables["encounters"].sort_values(["patient_id", "start", "encounter_id"])
    notes = tables["notes"].set_index("encounter_id")["text"]
    # Independent of the parser: a plan that lists an order has a bullet or a colon list.
    has_orders = notes.str.contains(r"## Plan\n(?:.*\n)*?(?:- |.*: \S)", regex=True)
    nxt = pd.merge_asof(
        enc[["encounter_id", "patient_id", "end"]].sort_values("end"),
        enc[["encounter_id", "patient_id", "start"]]
        .rename(columns={"encounter_id": "next_id"})
        .sort_values("start"),
        left_on="end",
        right_on="start",
        by="patient_id",
        direction="forward",
        allow_exact_matches=False,
    ).dropna(subset=["next_id"])
    eligible = nxt[nxt["next_id"].map(has_orders).fillna(False).astype(bool)]
    idx = tables["index_encounters"]
    covered = eligible["encounter_id"].isin(idx.loc[idx["n_plan_items"] > 0, "encounter_id"]).mean()
    assert len(eligible) > 100
    assert covered >= 0.9, f"only {covered:.1%} of plan-followed encounters became index encounters"
    assert idx["is_obstetric"].sum() > 0, "no obstetric index encounter in a cohort of 30 women"
    plans = tables["reference_plans"].set_index("encounter_id")
    assert (plans.loc[idx["next_encounter_id"], "n_items"] > 0).all()


@pytest.mark.slow
def test_ingest_twice_gives_identical_tables(generated_cohort: Path, tmp_path: Path) -> None:
    a, b = Workspace.at(tmp_path / "a"), Workspace.at(tmp_path / "b")
    ingest_fhir(a, generated_cohort)
    ingest_fhir(b, generated_cohort)
    for name in (
        "patients",
        "encounters",
        "events",
        "notes",
        "reference_plans",
        "plan_items",
        "index_encounters",
    ):
        ta, tb = pq.read_table(a.table_path(name)), pq.read_table(b.table_path(name))
        assert ta.equals(tb), name
    assert (
        a.read_manifest()["steps"]["ingest"]["data_hash"]
        == b.read_manifest()["steps"]["ingest"]["data_hash"]
    )


@pytest.mark.slow
def test_one_and_two_workers_agree(generated_cohort: Path) -> None:
    one = read_fhir_folder(generated_cohort, workers=1)
    two = read_fhir_folder(generated_cohort, workers=2)
    for name in ("patients", "encounters", "events", "notes", "quarantine"):
        pd.testing.assert_frame_equal(getattr(one, name), getattr(two, name))
    assert one.summary.as_dict() == two.summary.as_dict()


# ---------------------------------------------------------------- property-based bad input


MUTATIONS = ("drop_field", "bad_date", "dangling_ref", "duplicate", "wrong_type", "null_resource")


def _mutate(bundle: dict[str, Any], ops: list[tuple[str, int]]) -> dict[str, Any]:
    entries = bundle["entry"]
    for op, pick in ops:
        entry = entries[pick % len(entries)]
        res = entry.get("resource")
        if not isinstance(res, dict):
            continue
        keys = [k for k in res if k != "resourceType"]
        if op == "drop_field" and keys:
            res.pop(keys[pick % len(keys)])
        elif op == "bad_date":
            for k in list(res):
                if k.endswith(("DateTime", "Date", "authoredOn")) or k in ("date", "birthDate"):
                    res[k] = "not-a-date"
        elif op == "dangling_ref":
            for k in ("subject", "patient", "encounter"):
                if k in res:
                    res[k] = {"reference": f"urn:uuid:missing-{pick}"}
        elif op == "duplicate":
            entries.append(json.loads(json.dumps(entry)))
        elif op == "wrong_type":
            res["resourceType"] = ["Patient", "Encounter", "Observation", "Unknown"][pick % 4]
        elif op == "null_resource":
            entry["resource"] = None
    return bundle


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 10_000)), min_size=1, max_size=8
    ),
    corrupt=st.one_of(st.none(), st.integers(0, 10_000)),
)
@pytest.mark.slow
def test_mutated_real_bundles_never_crash_and_reconcile(
    real_bundle: bytes,
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, int]],
    corrupt: int | None,
) -> None:
    folder = tmp_path_factory.mktemp("mutated")
    bundle = _mutate(json.loads(real_bundle), ops)
    raw = json.dumps(bundle).encode()
    if corrupt is not None:  # a byte cut or a stray non-UTF-8 byte
        pos = corrupt % len(raw)
        raw = raw[:pos] if corrupt % 2 else raw[:pos] + b"\xff" + raw[pos:]
    write(folder, "mutated.json", raw)
    write(folder, "intact.json", tiny_bundle())
    t = read_fhir_folder(folder)
    s = t.summary
    assert s.reconciles(), s.as_dict()
    assert s.files_read + s.files_quarantined == 2
    assert len(t.quarantine) == s.quarantined + s.files_quarantined
    assert t.quarantine["reason"].str.len().gt(0).all()
    # the intact file is always fully kept
    assert (t.patients["source_file"] == file_id("intact.json")).sum() == 1
    tables = derive(t)  # derived tables never fail on what the reader kept
    assert set(tables["index_encounters"]["patient_id"]) <= set(t.patients["patient_id"])
    shutil.rmtree(folder)


def test_reason_mentions_resource_type_and_id(tmp_path: Path) -> None:
    bundle = tiny_bundle()
    bundle["entry"][2]["resource"]["performedDateTime"] = "2020-13-45"
    write(tmp_path, "x.json", bundle)
    q = read_fhir_folder(tmp_path).quarantine.iloc[0]
    assert (q["resource_type"], q["resource_id"]) == ("Procedure", "proc-1")
    assert re.search(r"unparsable performedDateTime '2020-13-45'", q["reason"])
