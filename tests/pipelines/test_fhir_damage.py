"""Damaged FHIR: a number, a string, an object and an array at every field of real
resources, as bundles and as Bulk Data. Never a raw exception; counts reconcile."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bulk_export import export_bulk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fhir import PATIENT_ID, tiny_bundle, write

from pipelines.fhir import read_fhir_folder
from pipelines.fhir.resources import RESOURCE_PARSERS
from pipelines.ingest import derive
from pipelines.sources import SourceTables

#: What is put at a field, in turn.
VALUES: dict[str, Any] = {"number": 5, "string": "x", "object": {"a": 1}, "array": [1, "x"]}
Path_ = tuple[str | int, ...]


def coded(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}]}


def rich_bundle() -> dict[str, Any]:
    """`tiny_bundle` and one resource of every other type that is read."""
    bundle = tiny_bundle()
    subject = {"reference": f"urn:uuid:{PATIENT_ID}"}
    enc = bundle["entry"][2]["resource"]["encounter"]
    bundle["entry"][0]["resource"]["extension"] = [
        {
            "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
            "extension": [{"url": "text", "valueString": "White"}],
        }
    ]
    sct = "http://snomed.info/sct"
    more = [
        {
            "resourceType": "Condition",
            "id": "cond-1",
            "subject": subject,
            "encounter": enc,
            "code": coded(sct, "72892002", "Normal pregnancy"),
            "onsetDateTime": "2020-01-01T10:00:00+00:00",
            "verificationStatus": coded("x", "confirmed", "Confirmed"),
        },
        {
            "resourceType": "Observation",
            "id": "obs-1",
            "status": "final",
            "subject": subject,
            "encounter": enc,
            "code": coded("http://loinc.org", "85354-9", "Blood pressure"),
            "effectiveDateTime": "2020-01-01T10:05:00+00:00",
            "component": [
                {
                    "code": coded("http://loinc.org", "8480-6", "Systolic"),
                    "valueQuantity": {"value": 120, "unit": "mm[Hg]"},
                }
            ],
        },
        {
            "resourceType": "Medication",
            "id": "med-1",
            "code": coded("http://www.nlm.nih.gov/research/umls/rxnorm", "310965", "Ibuprofen"),
        },
        {
            "resourceType": "MedicationRequest",
            "id": "mr-1",
            "status": "active",
            "subject": subject,
            "encounter": enc,
            "medicationReference": {"reference": "urn:uuid:med-1"},
            "authoredOn": "2020-01-01T10:10:00+00:00",
        },
        {
            "resourceType": "Immunization",
            "id": "imm-1",
            "status": "completed",
            "patient": subject,
            "encounter": enc,
            "vaccineCode": coded("http://hl7.org/fhir/sid/cvx", "140", "Influenza"),
            "occurrenceDateTime": "2020-01-01T10:20:00+00:00",
        },
        {
            "resourceType": "CarePlan",
            "id": "cp-1",
            "status": "active",
            "subject": subject,
            "encounter": enc,
            "category": [coded(sct, "134435003", "Routine antenatal care")],
            "period": {"start": "2020-01-01T10:00:00+00:00"},
            "activity": [{"detail": {"code": coded(sct, "135892000", "Antenatal education")}}],
        },
        {
            "resourceType": "AllergyIntolerance",
            "id": "al-1",
            "patient": subject,
            "code": coded(sct, "300916003", "Latex allergy"),
            "recordedDate": "2019-05-01T00:00:00+00:00",
        },
    ]
    bundle["entry"].extend({"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in more)
    return bundle


def paths(value: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """The path of every field and list item under ``value``."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        yield (*prefix, key)
        if isinstance(child, dict | list):
            yield from paths(child, (*prefix, key))


def put(resource: dict[str, Any], path: Path_, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = copy.deepcopy(value)
    return out


def check(t: SourceTables, files: int, intact_patients: int = 0) -> None:
    """No raw exception got here; the counts reconcile and every row has a reason."""
    s = t.summary
    assert s.reconciles(), s.as_dict()
    assert s.files_read + s.files_quarantined == files, s.as_dict()
    assert len(t.quarantine) == s.quarantined + s.files_quarantined
    assert t.quarantine["reason"].str.len().gt(0).all()
    assert len(t.patients) >= intact_patients
    tables = derive(t)  # derived tables never fail on what the reader kept
    assert set(tables["index_encounters"]["patient_id"]) <= set(t.patients["patient_id"])


def read_both(bundle: dict[str, Any], folder: Path) -> None:
    """``bundle`` as a bundle file and as a Bulk Data export; both are checked."""
    raw = json.dumps(bundle).encode()
    write(folder / "bundles", "damaged.json", raw)
    check(read_fhir_folder(folder / "bundles", workers=1), files=1)
    export_bulk([folder / "bundles" / "damaged.json"], folder / "bulk")
    t = read_fhir_folder(folder / "bulk", workers=1)
    check(t, files=len(list((folder / "bulk").glob("*.ndjson*"))))
    shutil.rmtree(folder)


def damaged_copies(bundle: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``bundle`` with one field of one resource replaced, for every field and value kind."""
    for i, entry in enumerate(bundle["entry"]):
        for path in list(paths(entry["resource"])):
            for value in VALUES.values():
                damaged = copy.deepcopy(bundle)
                damaged["entry"][i]["resource"] = put(entry["resource"], path, value)
                yield damaged


def test_every_field_of_every_read_type_takes_every_kind_of_value(tmp_path: Path) -> None:
    """Each damaged copy is a file of its own (references resolve within a file), all
    read at once: the copies repeat or conflict with each other, which is counted too."""
    bundle = rich_bundle()
    assert {e["resource"]["resourceType"] for e in bundle["entry"]} >= set(RESOURCE_PARSERS) - {
        "Binary"
    }
    n = 0
    for n, damaged in enumerate(damaged_copies(bundle), start=1):
        write(tmp_path, f"{n:04d}.json", damaged)
    assert n > 400
    check(read_fhir_folder(tmp_path, workers=1), files=n)


def test_every_field_takes_every_kind_of_value_in_bulk_data(tmp_path: Path) -> None:
    """The same as Bulk Data: each copy an export of its own (fresh ids), one read."""
    copies = [
        json.loads(json.dumps(d).replace("-1111-", f"-{n:04d}-"))
        for n, d in enumerate(damaged_copies(rich_bundle()))
    ]
    for n, damaged in enumerate(copies):
        write(tmp_path / "bundles", f"{n:04d}.json", damaged)
    export_bulk(sorted((tmp_path / "bundles").glob("*.json")), tmp_path / "bulk")
    t = read_fhir_folder(tmp_path / "bulk", workers=1)
    check(
        t, files=len(list((tmp_path / "bulk").glob("*.ndjson*"))), intact_patients=len(copies) // 2
    )


#: Stands for an array nested 5,000 deep (too deep for Python's json and copy).
DEEP = "__deep__"


def raw_json(value: Any) -> bytes:
    return json.dumps(value).replace(f'"{DEEP}"', "[" * 5000 + "1" + "]" * 5000).encode()


def _set(rtype: str, path: Path_, value: Any) -> tuple[dict[str, Any], bytes]:
    """The rich bundle with ``value`` at ``path`` of its ``rtype``, and that resource's JSON."""
    bundle = rich_bundle()
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == rtype:
            entry["resource"] = put(entry["resource"], path, value)
            line = raw_json(entry["resource"])
    return bundle, line


@pytest.mark.parametrize(
    ("bundle", "reason"),
    [
        (_set("Patient", ("extension",), 5), "extension is not a list (a int)"),
        (_set("Observation", ("component",), 7), "component is not a list (a int)"),
        (_set("CarePlan", ("category", 0, "coding"), "x"), "category.coding is not a list"),
        (_set("Patient", ("gender",), {"a": 1}), "gender is not a string (a dict)"),
        (_set("Procedure", ("code", "coding", 0, "display"), 5), None),
        (_set("Observation", ("code",), DEEP), "malformed JSON"),
        (_set("Observation", ("valueQuantity",), {"value": 10**400}), "BIGINT_ERROR"),
    ],
    ids=[
        "extension-5",
        "component-7",
        "careplan-coding-string",
        "gender-object",
        "display-number",
        "deep-array",
        "huge-integer",
    ],
)
def test_inputs_that_crashed_are_quarantined_with_a_reason(
    tmp_path: Path, bundle: tuple[dict[str, Any], bytes], reason: str | None
) -> None:
    damaged, line = bundle
    write(tmp_path / "b", "damaged.json", raw_json(damaged))
    write(tmp_path / "b", "intact.json", rich_bundle())
    export_bulk([tmp_path / "b" / "intact.json"], tmp_path / "bulk")
    write(tmp_path / "bulk", "Damaged.ndjson", line + b"\n")
    (tmp_path / "bulk" / "manifest.json").unlink()  # read every file of the folder
    for folder, files in (("b", 2), ("bulk", len(list((tmp_path / "bulk").iterdir())))):
        t = read_fhir_folder(tmp_path / folder, workers=1)
        check(t, files=files, intact_patients=1)
        if reason is None:  # read: it differs from the intact copy
            assert t.quarantine["reason"].str.startswith("conflicting duplicate").all()
        else:
            assert any(reason in r for r in t.quarantine["reason"]), t.quarantine["reason"]


def real_fields(real: dict[str, Any]) -> list[tuple[int, Path_]]:
    read = set(RESOURCE_PARSERS)
    return [
        (i, path)
        for i, entry in enumerate(real["entry"])
        if entry["resource"]["resourceType"] in read
        for path in paths(entry["resource"])
    ]


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(pick=st.integers(0, 10**9), kind=st.sampled_from(sorted(VALUES)), n=st.integers(1, 4))
@pytest.mark.slow
def test_real_resources_take_every_kind_of_value_as_bundles_and_bulk_data(
    real_bundle: bytes, tmp_path_factory: pytest.TempPathFactory, pick: int, kind: str, n: int
) -> None:
    real = json.loads(real_bundle)
    fields = real_fields(real)
    for k in range(n):  # n fields of real resources at once
        i, path = fields[(pick + k * 7919) % len(fields)]
        try:
            real["entry"][i]["resource"] = put(real["entry"][i]["resource"], path, VALUES[kind])
        except (KeyError, IndexError, TypeError):  # an earlier change removed its parent
            continue
    read_both(real, tmp_path_factory.mktemp("damaged"))
