"""FHIR inputs as hospitals hold them: EHDS document bundles in subfolders, every
bundle type, symbolic links, the size limit."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from test_fhir import tiny_bundle, write

from pipelines.cohort import CohortSpec, _synthea_executable
from pipelines.fhir import read_fhir_folder
from pipelines.identity import file_id
from pipelines.ingest import ingest_fhir
from pipelines.workspace import Workspace

EHDS_DOCUMENTS = ("patient-summary", "discharge-report", "eprescription", "laboratory-result")


@pytest.fixture(scope="session")
def ehds_cohort(made_once: Callable[[str], AbstractContextManager[tuple[Path, bool]]]) -> Path:
    """Five women generated with ``synthea --locale es`` (EHDS document bundles, ~15 s)."""
    with made_once("synthea-es-5") as (out, made_before):
        if not made_before:
            cmd = [*CohortSpec(n=5, seed=3).command(out, threads=1), "--locale", "es"]
            cmd[0] = _synthea_executable()
            subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_ehds_documents_ingest_from_the_folder_as_written(
    ehds_cohort: Path, tmp_path: Path
) -> None:
    """Acceptance: no traceback, every patient, no quarantine for identical repeats,
    index encounters, and the summary says where plans came from."""
    folders = {p.name for p in (ehds_cohort / "fhir").iterdir()}
    assert set(EHDS_DOCUMENTS) <= folders
    women = len(list((ehds_cohort / "fhir" / "patient-summary").glob("*.json")))
    assert women == 5
    summary = ingest_fhir(Workspace.at(tmp_path), ehds_cohort, workers=2)
    ingest = summary["ingest"]
    assert ingest["read"] == ingest["kept"] + ingest["quarantined"] + ingest["skipped"]
    assert summary["patients"] == women
    assert summary["quarantined"] == 0, summary["quarantine_reasons"]
    assert ingest["skipped_by_reason"]["identical repeat"] > ingest["kept"] / 2
    assert ingest["skipped_by_type"]["Composition"] == ingest["files_read"]
    assert summary["index_encounters"] > 0
    assert summary["plan_sources"] == {"events": summary["reference_plans"]}
    assert "no clinical notes" in summary["remark"]


@pytest.mark.parametrize("btype", ["document", "collection", "transaction", "batch", "searchset"])
def test_every_bundle_type_is_read(tmp_path: Path, btype: str) -> None:
    bundle = tiny_bundle()
    bundle["type"] = btype
    if btype == "searchset":  # an outcome entry beside the matches
        bundle["entry"].append(
            {"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}}
        )
    write(tmp_path / "a" / "b", "x.json", bundle)
    t = read_fhir_folder(tmp_path)
    assert t.summary.reconciles() and t.quarantine.empty
    assert (len(t.patients), len(t.encounters), len(t.events), len(t.notes)) == (1, 1, 1, 1)
    assert t.patients["source_file"].tolist() == [file_id("a/b/x.json")]


def test_history_bundles_are_quarantined_with_what_to_do(tmp_path: Path) -> None:
    write(tmp_path, "h.json", {**tiny_bundle(), "type": "history"})
    t = read_fhir_folder(tmp_path)
    assert t.summary.files_quarantined == 1
    assert "Bundle type 'history' is not read" in t.quarantine["reason"][0]


def test_references_to_full_urls_resolve(tmp_path: Path) -> None:
    bundle = tiny_bundle()
    for i, entry in enumerate(bundle["entry"]):  # fullUrls that are not the ids
        entry["fullUrl"] = f"urn:uuid:00000000-0000-0000-0000-00000000000{i}"
    text = json.dumps(bundle)
    text = text.replace(
        "urn:uuid:11111111-1111-1111-1111-111111111111",
        "urn:uuid:00000000-0000-0000-0000-000000000000",
    )
    write(tmp_path, "a.json", json.loads(text))
    t = read_fhir_folder(tmp_path)
    assert t.quarantine.empty, t.quarantine
    assert len(t.events) == 1


def test_links_out_of_the_input_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside, "secret.json", tiny_bundle())
    inside = tmp_path / "in"
    other = json.loads(json.dumps(tiny_bundle()).replace("1111", "5555"))
    write(inside, "a.json", other)
    os.symlink(outside / "secret.json", inside / "link.json")
    os.symlink(outside, inside / "folder")
    os.symlink(inside / "a.json", inside / "same.json")  # inside: read (a repeat)
    t = read_fhir_folder(inside)
    reasons = dict(zip(t.quarantine["source_file"], t.quarantine["reason"], strict=True))
    assert reasons == {
        "link.json": "symbolic link to a file outside the input: refused",
        "folder": "symbolic link to a folder outside the input: refused",
    }
    assert t.summary.files_quarantined == 2 and t.summary.reconciles()
    assert len(t.patients) == 1
    assert t.summary.skipped_by_reason == {"identical repeat": 4}


def test_files_over_the_size_limit_are_quarantined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "a.json", tiny_bundle())
    monkeypatch.setenv("PMLM_MAX_FILE_MB", "0.001")
    t = read_fhir_folder(tmp_path)
    assert t.summary.files_quarantined == 1
    assert "over the 0 MB limit: split it, or raise PMLM_MAX_FILE_MB" in t.quarantine["reason"][0]
