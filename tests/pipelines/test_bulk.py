"""FHIR Bulk Data exports (NDJSON): the same tables as the bundles they were made from."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest
from bulk_export import SERVER, export_bulk
from test_fhir import tiny_bundle, write
from test_staged import assert_same_workspaces

from pipelines.fhir import FhirInputError, bulk, detect_format, read_fhir_folder, worker_pool
from pipelines.fhir.bulk import Partition, partition_export
from pipelines.fhir.inputs import bulk_files
from pipelines.fhir.merge import SHARED_PART
from pipelines.fhir.reader import SPANS_SUFFIX, FhirReader
from pipelines.identity import file_id, workspace_salt
from pipelines.ingest import derive, write_cohort
from pipelines.sources import SOURCE_ID_COLUMN
from pipelines.staged import ingest_fhir_staged
from pipelines.workspace import Workspace

RECORD_TABLES = ("patients", "encounters", "events", "notes")
DERIVED_TABLES = ("reference_plans", "plan_items", "index_encounters")


def canonical(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Every canonical table but ``patients.source_file`` (the file a patient came from)."""
    out = {name: tables[name].reset_index(drop=True) for name in RECORD_TABLES + DERIVED_TABLES}
    out["patients"] = out["patients"].drop(columns=["source_file"])
    return out


@pytest.fixture(scope="module")
def bulk_cohort(generated_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bulk") / "export"
    export_bulk(sorted(generated_cohort.glob("*.json")), out)
    return out


@pytest.mark.slow
def test_bulk_export_gives_the_tables_of_its_bundles(
    generated_cohort: Path, bulk_cohort: Path
) -> None:
    """Acceptance: a cohort's bundles and the same cohort as a Bulk Data export."""
    assert (bulk_cohort / "Observation.ndjson.gz").exists()
    assert detect_format(bulk_cohort) == "bulk"
    bundles = read_fhir_folder(generated_cohort, workers=1)
    bulk = read_fhir_folder(bulk_cohort / "manifest.json", workers=2)
    assert bulk.summary.reconciles() and bulk.quarantine.empty
    assert bulk.summary.kept_by_type == bundles.summary.kept_by_type
    assert bulk.summary.files_read == len(list(bulk_cohort.glob("*.ndjson*")))
    want, got = canonical(derive(bundles)), canonical(derive(bulk))
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], obj=name)
    assert len(want["index_encounters"]) > 100
    assert set(bulk.patients["source_file"]) == {file_id("Patient.ndjson")}


@pytest.mark.slow
def test_bulk_staged_equals_in_memory(bulk_cohort: Path, tmp_path: Path) -> None:
    memory = Workspace.at(tmp_path / "memory")
    source = read_fhir_folder(bulk_cohort, salt=workspace_salt(memory), workers=1)
    write_cohort(memory, source, input_description=f"fhir:{bulk_cohort}")
    staged = Workspace.at(tmp_path / "staged")
    ingest_fhir_staged(staged, bulk_cohort, workers=2)
    assert not (tmp_path / "staged" / ".staging").exists()
    assert_same_workspaces(memory, staged)


def ndjson(folder: Path, name: str, resources: list[dict]) -> Path:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in resources)
    return write(folder, name, gzip.compress(data) if name.endswith(".gz") else data)


def tiny_export(folder: Path) -> None:
    """`tiny_bundle` as an export, references in every form a server writes, the
    Patient file last (references resolve across files in any order)."""
    resources = [e["resource"] for e in tiny_bundle()["entry"]]
    patient, encounter, procedure, note, claim = resources
    encounter["subject"] = {"reference": f"{SERVER}/Patient/{patient['id']}"}
    procedure["subject"] = {"reference": f"Patient/{patient['id']}/_history/3"}
    procedure["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
    note["subject"] = {"reference": f"Patient/{patient['id']}"}
    note["context"] = {"encounter": [{"reference": f"Encounter/{encounter['id']}"}]}
    attachment = note["content"][0]["attachment"]
    binary = {"resourceType": "Binary", "id": "b1", "contentType": "text/plain"}
    binary["data"] = attachment.pop("data")
    attachment["url"] = f"{SERVER}/Binary/b1"
    ndjson(folder, "Binary.ndjson", [binary])
    ndjson(folder, "Encounter.ndjson", [encounter])
    ndjson(folder, "Procedure.ndjson.gz", [procedure])
    ndjson(folder, "DocumentReference.ndjson", [note])
    ndjson(folder, "Claim.ndjson", [claim])
    ndjson(folder, "Patient.ndjson", [patient])


def test_references_resolve_across_files_in_every_form(tmp_path: Path) -> None:
    tiny_export(tmp_path)
    t = read_fhir_folder(tmp_path)
    assert t.summary.reconciles() and t.quarantine.empty, t.quarantine
    assert (len(t.patients), len(t.encounters), len(t.events), len(t.notes)) == (1, 1, 1, 1)
    assert t.events["encounter_id"].tolist() == [t.encounters["encounter_id"][0]]
    assert "standard pregnancy test" in t.notes["text"][0]
    assert t.summary.skipped_by_type == {"Claim": 1}
    assert t.summary.kept_by_type["Binary"] == 1


def test_damaged_lines_are_quarantined_by_file_and_line(tmp_path: Path) -> None:
    tiny_export(tmp_path)
    with (tmp_path / "Encounter.ndjson").open("ab") as handle:
        handle.write(b'{"resourceType": "Encounter", "id": \n')  # cut JSON
        handle.write(b"[1, 2]\n")  # not a resource
        handle.write(b'{"resourceType": "Encounter", "id": "caf\xe9"}\n')  # not UTF-8
        handle.write(
            b'{"resourceType": "Encounter", "id": "e9", "subject": {"reference": "Patient/nobody"}}\n'
        )
    write(tmp_path, "Observation.ndjson.gz", gzip.compress(b'{"resourceType": "Obs')[:-6])
    t = read_fhir_folder(tmp_path)
    s = t.summary
    assert s.reconciles(), s.as_dict()
    rows = dict(zip(t.quarantine["source_file"], t.quarantine["reason"], strict=True))
    assert rows["Encounter.ndjson:2"].startswith("malformed JSON")
    assert rows["Encounter.ndjson:3"] == "not a FHIR resource (no resourceType)"
    assert rows["Encounter.ndjson:4"].startswith("not UTF-8")
    assert rows["Encounter.ndjson:5"] == "references absent Patient nobody"
    assert rows["Observation.ndjson.gz"].startswith("unreadable file")
    assert s.files_quarantined == 1
    assert len(t.encounters) == 1  # the good line is still read


def test_every_kind_of_damaged_gzip_file_is_quarantined_and_the_rest_is_read(
    tmp_path: Path,
) -> None:
    """A gzipped file cut short, with a wrong checksum, a bad header, or data that does
    not inflate: the file is quarantined, the other files are read, nothing escapes."""
    tiny_export(tmp_path)
    good = json.dumps({"resourceType": "Observation", "id": "o1"}).encode() + b"\n"
    whole = gzip.compress(good * 3, mtime=0)
    damaged = {
        "cut": whole[:-6],
        "checksum": whole[:-8] + bytes(8),
        "inflate": whole[:10] + b"\x07" + whole[11:],  # a deflate block of a reserved type
        "header": b"\x1f\x8b\x09" + whole[3:],  # an unknown compression method
    }
    for case, raw in damaged.items():
        write(tmp_path, "Observation.ndjson.gz", raw)
        t = read_fhir_folder(tmp_path)
        assert t.summary.reconciles(), (case, t.summary.as_dict())
        assert t.summary.files_quarantined == 1, case
        reasons = dict(zip(t.quarantine["source_file"], t.quarantine["reason"], strict=True))
        assert reasons["Observation.ndjson.gz"].startswith("unreadable file"), case
        assert len(t.encounters) == 1, case


def test_manifest_lists_the_files_and_a_missing_one_is_a_clear_error(tmp_path: Path) -> None:
    tiny_export(tmp_path)
    manifest = {"output": [{"type": "Patient", "url": f"{SERVER}/x/Patient.ndjson"}]}
    write(tmp_path, "manifest.json", manifest)
    t = read_fhir_folder(tmp_path / "manifest.json")
    assert len(t.patients) == 1 and len(t.encounters) == 0  # only the listed file
    manifest["output"].append({"type": "Condition", "url": f"{SERVER}/x/Condition.ndjson"})
    write(tmp_path, "manifest.json", manifest)
    with pytest.raises(FhirInputError, match=r"lists .*Condition\.ndjson.*copy the whole export"):
        read_fhir_folder(tmp_path)
    write(tmp_path, "manifest.json", b"{}")
    with pytest.raises(FhirInputError, match="not a Bulk Data manifest"):
        read_fhir_folder(tmp_path)


def test_a_repeated_line_is_an_identical_repeat(tmp_path: Path) -> None:
    tiny_export(tmp_path)
    lines = (tmp_path / "Encounter.ndjson").read_bytes()
    (tmp_path / "Encounter.ndjson").write_bytes(lines * 3)
    t = read_fhir_folder(tmp_path)
    assert t.summary.reconciles() and t.quarantine.empty
    assert t.summary.skipped_by_reason == {"identical repeat": 2}


def test_format_is_detected_or_chosen(tmp_path: Path) -> None:
    tiny_export(tmp_path / "bulk")
    write(tmp_path / "bundles", "a.json", tiny_bundle())
    assert detect_format(tmp_path / "bulk") == "bulk"
    assert detect_format(tmp_path / "bulk" / "Patient.ndjson") == "bulk"
    assert detect_format(tmp_path / "bundles") == "bundles"
    with pytest.raises(FhirInputError, match=r"holds no \*\.json FHIR bundles"):
        read_fhir_folder(tmp_path / "bulk", fmt="bundles")
    with pytest.raises(FhirInputError, match="unknown FHIR format 'xml'"):
        read_fhir_folder(tmp_path / "bulk", fmt="xml")


@pytest.mark.slow
def test_the_deny_list_of_the_one_reading_equals_the_reference_reader(
    generated_cohort: Path, bulk_cohort: Path, tmp_path: Path
) -> None:
    """The staged ingest's workers collect the identifiers as they read (each file is
    read once); they equal `fhir_identifiers`' second reading, for bundles and Bulk Data."""
    import json

    from pipelines.fhir import bulk_files, bundle_files
    from pipelines.identifiers import fhir_identifiers, identifiers_path
    from pipelines.ingest import ingest_fhir

    for name, folder, files in (
        ("bundles", generated_cohort, bundle_files(generated_cohort).files),
        ("bulk", bulk_cohort, bulk_files(bulk_cohort).files),
    ):
        ws = Workspace.at(tmp_path / name)
        ingest_fhir(ws, folder, workers=2)
        written = json.loads(identifiers_path(ws).read_text())["patients"]
        reference = fhir_identifiers(files, workspace_salt(ws))
        assert len(reference) == 30 and all(v["names"] for v in reference.values())
        assert written == reference, name


def _parts(partition: Partition) -> list[bytes]:
    """Each part's lines in the order its reader meets them (its pieces by name)."""
    return [b"".join(p.read_bytes() for p in sorted(part.iterdir())) for part in partition.parts]


def test_a_pool_routes_the_parts_of_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a pool, the partition pass writes the parts, counts, quarantine and shared
    Medications of the one-process pass, line for line: pending and damaged lines, a
    truncated gzip file; an export that mixes types in a file is routed by the parent."""
    monkeypatch.setattr(bulk, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(bulk, "PATIENTS_PER_PART", 1)
    export = tmp_path / "export"
    tiny_export(export)
    patient = json.loads((export / "Patient.ndjson").read_bytes())
    encounter = json.loads((export / "Encounter.ndjson").read_bytes())
    second = {**patient, "id": "p2"}
    ndjson(export, "Patient.ndjson", [patient, second])
    with (export / "Encounter.ndjson").open("ab") as handle:
        for line in (
            {**encounter, "id": "e2", "subject": {"reference": "Patient/p2"}},
            {**encounter, "id": "e3", "subject": {"reference": "Patient/nobody"}},  # pending
        ):
            handle.write(json.dumps(line).encode() + b"\n")
        handle.write(b'{"resourceType": "Encounter", "id": \n')  # cut JSON
    med = {"resourceType": "Medication", "id": "m1", "code": {"text": "folic acid"}}
    ndjson(export, "Medication.ndjson", [med, {"resourceType": "Medication"}])
    write(export, "Observation.ndjson.gz", gzip.compress(b'{"resourceType": "Obs')[:-6])
    with worker_pool(2) as pool:
        for case in ("one type a file", "a file mixes types"):
            found = bulk_files(export)
            one = partition_export(found.files, found.names(), tmp_path / case / "one")
            pooled = partition_export(found.files, found.names(), tmp_path / case / "pool", pool)
            assert _parts(pooled) == _parts(one), case
            assert pooled.summary.as_dict() == one.summary.as_dict(), case
            assert pooled.quarantine == one.quarantine, case
            shared = [(tmp_path / case / k / SHARED_PART).read_text() for k in ("one", "pool")]
            assert shared[0] == shared[1] and "folic acid" in shared[0]
            assert one.summary.files_quarantined == 1
            assert len(one.parts) == (2 if case == "one type a file" else 3)
            # the next round: a Patient in another type's file (its lines cross files)
            third = {**patient, "id": "p3"}
            ndjson(export, "Condition.ndjson", [third])
    assert read_fhir_folder(export, workers=2).summary.reconciles()


def test_parts_point_at_the_lines_of_uncompressed_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part's piece of an uncompressed file holds spans (consecutive lines as one),
    not the lines; a gzipped file's lines are copied. The pieces do not depend on when
    the pass's buffer fills, and they read back as the lines themselves."""
    monkeypatch.setattr(bulk, "PATIENTS_PER_PART", 2)
    export = tmp_path / "export"
    ndjson(export, "Patient.ndjson", [{"resourceType": "Patient", "id": f"p{i}"} for i in range(5)])
    ndjson(
        export,
        "Encounter.ndjson",
        [
            {
                "resourceType": "Encounter",
                "id": f"e{i}{k}",
                "subject": {"reference": f"Patient/p{i}"},
            }
            for i in range(5)
            for k in range(3)
        ],
    )
    ndjson(
        export,
        "Condition.ndjson.gz",
        [
            {"resourceType": "Condition", "id": f"c{i}", "subject": {"reference": f"Patient/p{i}"}}
            for i in range(5)
        ],
    )
    found = bulk_files(export)
    whole = partition_export(found.files, found.names(), tmp_path / "whole")
    monkeypatch.setattr(bulk, "_BUFFER_BYTES", 1)  # a flush after every line
    flushed = partition_export(found.files, found.names(), tmp_path / "flushed")
    assert _parts(flushed) == _parts(whole)
    assert len(whole.parts) == 3
    reader = FhirReader(None, found.names())
    pieces = sorted(whole.parts[0].iterdir())
    # in routing order (Patients first): the gzipped file's lines are copied, the others
    # are spans, consecutive lines as one
    patients, conditions, encounters = pieces
    assert [p.name.endswith(SPANS_SUFFIX) for p in pieces] == [True, False, True]
    assert conditions.read_bytes().count(b"\n") == 2  # c0 and c1
    assert [len(p.read_text().splitlines()) for p in (patients, encounters)] == [1, 1]
    spans = (patients, encounters)
    lines = [json.loads(raw)["id"] for p in spans for _, raw in reader.span_lines(p)]
    assert lines == ["p0", "p1"] + [f"e{i}{k}" for i in (0, 1) for k in range(3)]


def test_a_file_that_changes_between_the_pass_and_the_reading_is_a_clear_error(
    tmp_path: Path,
) -> None:
    export = tmp_path / "export"
    tiny_export(export)
    found = bulk_files(export)
    partition = partition_export(found.files, found.names(), tmp_path / "parts")
    encounters = export / "Encounter.ndjson"
    encounters.write_bytes(b"\n" + encounters.read_bytes())  # a line more, everything moved
    reader = FhirReader(None, found.names())
    with pytest.raises(FhirInputError, match=r"Encounter.ndjson changed while it was ingested"):
        reader.read_part(partition.parts[0])


def test_a_file_the_manifest_declares_unread_is_counted_not_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest's type of a file (one type per file, as the specification says):
    a type PMLM does not read is counted by lines, damaged lines included; a file
    whose first line is not the declared type is routed line by line. In one process
    and in a pool (which routes every file of this small export: no size threshold)."""
    monkeypatch.setattr(bulk, "POOL_MIN_BYTES", 0)
    tiny_export(tmp_path)
    claim = json.dumps({"resourceType": "Claim", "id": "c1"}).encode()
    # in place of the tiny export's Claim file: a line, a blank one, a cut one, a line
    write(tmp_path, "Claim.ndjson", claim + b"\n\n" + b'{"resourceType": "Cla\n' + claim + b"\n")
    patient = json.loads((tmp_path / "Patient.ndjson").read_bytes())
    second = json.dumps({**patient, "id": "p2"}).encode()
    write(tmp_path, "Coverage.ndjson", second + b"\n")  # declared Coverage, holds a Patient
    cut = gzip.compress(claim + b"\n" + claim + b"\n", mtime=0)[:-6]
    write(tmp_path, "Provenance.ndjson.gz", cut)  # declared Provenance, cut short
    declared = {"Claim.ndjson": "Claim", "Coverage.ndjson": "Coverage"}
    declared["Provenance.ndjson.gz"] = "Provenance"
    for mixed in (False, True):  # True: a Patient in another type's file, routed by the parent
        if not mixed:
            (tmp_path / "Coverage.ndjson").rename(tmp_path / "held")
        else:
            (tmp_path / "held").rename(tmp_path / "Coverage.ndjson")
        files = sorted(p.name for p in tmp_path.glob("*.ndjson*"))
        output = [
            {"type": declared.get(f, f.split(".")[0]), "url": f"{SERVER}/x/{f}"} for f in files
        ]
        write(tmp_path, "manifest.json", json.dumps({"output": output}).encode())
        for workers in (1, 2):
            t = read_fhir_folder(tmp_path, workers=workers)
            s = t.summary
            assert s.reconciles(), s.as_dict()
            assert s.skipped_by_type["Claim"] == 3  # a blank line is not a line
            assert "Coverage" not in s.skipped_by_type
            expected = [patient["id"], "p2"] if mixed else [patient["id"]]
            assert sorted(t.patients[SOURCE_ID_COLUMN]) == sorted(expected)
            assert s.files_quarantined == 1  # the cut Provenance file
            reasons = dict(zip(t.quarantine["source_file"], t.quarantine["reason"], strict=True))
            assert reasons["Provenance.ndjson.gz"].startswith("unreadable file")
