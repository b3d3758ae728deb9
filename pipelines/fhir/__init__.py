"""FHIR R4 source: bundles (nested folders) or a Bulk Data export → canonical tables.

Inputs (`pipelines.fhir.inputs`): a folder tree of Bundles of type document,
collection, transaction, batch or searchset (as Synthea writes them, US Core
or EHDS/IPS profiles), or a Bulk Data export (a folder of one NDJSON file per
resource type, ``.ndjson`` or ``.ndjson.gz``, or its ``manifest.json``).
`detect_format` tells them apart; ``fmt`` chooses.

Read resource types (`pipelines.fhir.resources.RESOURCE_PARSERS`, one parser
each): Patient, Encounter, Condition, Procedure, MedicationRequest (with a
medicationCodeableConcept or a medicationReference to a contained or a listed
Medication), Immunization, Observation, CarePlan, AllergyIntolerance,
DocumentReference (text/plain and text/html notes, inline or in a Binary),
Medication and Binary. Every other resource type is counted in
``summary.skipped_by_type``, not an error.

Bad input never stops the run silently and never crashes it without a reason:

- a file that is not UTF-8, not JSON, not a Bundle, over the size limit, or a
  symbolic link out of the input folder → one quarantine row for the file
  (``resource_type`` empty), counted in ``files_quarantined``; a damaged line
  of an NDJSON file → one quarantine row named ``FILE:LINE``;
- a resource missing a required field, with a value of the wrong type, an
  unparsable date, a conflicting duplicate id, or a reference to a patient or
  encounter that is absent (or was itself quarantined) → one quarantine row
  with the reason;
- a resource entered in error, refuted, cancelled or not done, and an identical
  repeat of a resource already read → counted in ``summary.skipped_by_reason``.

References resolve within a unit: a bundle, or the part of an export that
holds one group of patients (`pipelines.fhir.bulk`). The tables do not depend
on how units are grouped for reading: one reader or many processes, in memory
or staged (`pipelines.staged`), give the same result.

Usage::

    tables = read_fhir_folder(Path("synthea-out/fhir"))
    tables.summary.reconciles()  # True
"""

from __future__ import annotations

import tempfile
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from pipelines.fhir.bulk import partition_export
from pipelines.fhir.inputs import (
    FhirInputError,
    InputFiles,
    bulk_files,
    bundle_files,
    detect_format,
)
from pipelines.fhir.merge import (
    CHUNK_FILES,
    ID_COLUMNS,
    dedupe,
    file_chunks,
    map_chunks,
    merge_chunks,
    merge_summaries,
    read_chunk,
    sorted_tables,
    worker_pool,
)
from pipelines.fhir.reader import FILE_COLUMN, SOURCE_ID_COLUMN, typed
from pipelines.fhir.resources import EVENT_RESOURCES, KIND_RESOURCE, RESOURCE_PARSERS, SOURCE
from pipelines.fhir.values import Rejected, parse_time, reference_id
from pipelines.schemas import QUARANTINE
from pipelines.sources import IngestSummary, SourceTables, frame

__all__ = [
    "CHUNK_FILES",
    "EVENT_RESOURCES",
    "FILE_COLUMN",
    "ID_COLUMNS",
    "KIND_RESOURCE",
    "RESOURCE_PARSERS",
    "SOURCE",
    "SOURCE_ID_COLUMN",
    "FhirInputError",
    "PreparedInput",
    "Rejected",
    "bundle_files",
    "dedupe",
    "detect_format",
    "file_chunks",
    "map_chunks",
    "merge_summaries",
    "parse_time",
    "prepare_input",
    "read_chunk",
    "read_fhir_folder",
    "reference_id",
    "sorted_tables",
    "typed",
    "worker_pool",
]


@dataclass
class PreparedInput:
    """An input ready to read in chunks: its units, their names and what was refused."""

    format: str
    units: list[Path]
    names: list[str]
    chunk_size: int
    before: SourceTables

    def chunks(self, size: int | None = None) -> list[tuple[int, list[Path]]]:
        return file_chunks(self.units, size if self.format == "bundles" else self.chunk_size)


def _refused(found: InputFiles) -> tuple[IngestSummary, list[dict[str, str | None]]]:
    summary = IngestSummary(source=SOURCE, files_quarantined=len(found.refused))
    rows = [
        {
            "source": SOURCE,
            "source_file": name,
            "resource_type": None,
            "resource_id": None,
            "reason": reason,
        }
        for name, reason in found.refused
    ]
    return summary, rows


def prepare_input(
    path: Path, fmt: str, staging: Path, pool: Executor | None = None
) -> PreparedInput:
    """List (bundles) or partition (Bulk Data, into ``staging``; by ``pool``'s processes
    too when given) the input at ``path``."""
    kind = detect_format(path, fmt)
    found = bundle_files(path) if kind == "bundles" else bulk_files(path)
    summary, rows = _refused(found)
    names = found.names()
    units, chunk_size = found.files, CHUNK_FILES
    if kind == "bulk":
        partition = partition_export(found.files, names, staging, pool, found.declared)
        summary.add(partition.summary)
        rows.extend(partition.quarantine)
        units, chunk_size = partition.parts, 1
    empty = frame([], [])
    before = SourceTables(
        patients=empty,
        encounters=empty,
        events=empty,
        notes=empty,
        quarantine=frame(rows, QUARANTINE.names),
        summary=summary,
    )
    return PreparedInput(kind, units, names, chunk_size, before)


def read_fhir_folder(
    folder: Path, salt: str | None = None, workers: int | None = None, fmt: str = "auto"
) -> SourceTables:
    """Read every resource of a FHIR input into record-level canonical tables, in memory.

    ``patients`` carries ``SOURCE_ID_COLUMN`` (the source id, for the crosswalk:
    `pipelines.identity`); writing a table drops it.

    Units are read in chunks by ``workers`` processes (default: the number of
    CPUs; 1 reads in this process); the result does not depend on either. For a
    large cohort, `pipelines.staged.ingest_fhir_staged` writes a workspace
    without holding every table in memory.
    """
    with tempfile.TemporaryDirectory(prefix="pmlm-fhir-") as tmp, worker_pool(workers) as pool:
        prepared = prepare_input(Path(folder), fmt, Path(tmp), pool)
        parts = map_chunks(
            read_chunk, prepared.chunks(), salt, prepared.names, workers=workers, pool=pool
        )
        return merge_chunks(parts, prepared.names, prepared.before)
