"""The FHIR reader: units of resources (a bundle file, or a part of a Bulk Data
export) → rows of the canonical tables, with quarantine and counts.

A *unit* is a set of resources within which references resolve: one bundle
file, or one part of a Bulk Data export (`pipelines.fhir.bulk`: every
resource of a group of patients). Each row carries ``FILE_COLUMN``, its
*origin*: the number of its input file times 2**32 plus its line in that file
(an NDJSON file) or its entry number (a bundle), so that the first occurrence
of a repeated id is the same however units are grouped, and a duplicate found
later can name where it was read.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import simdjson

from pipelines.fhir.inputs import FhirInputError
from pipelines.fhir.resources import RESOURCE_PARSERS, SOURCE, Filtered
from pipelines.fhir.values import Coding, Rejected, reference_id, reference_target
from pipelines.identifiers import PatientIdentifiers, merge_identifiers, patient_identifiers
from pipelines.identity import file_id
from pipelines.schemas import ENCOUNTERS, EVENTS, NOTES, PATIENTS, QUARANTINE
from pipelines.sources import SOURCE_ID_COLUMN, IngestSummary, SourceTables, frame, pseudonym

#: Internal column: the origin of a row (file number × 2**32 + line), dropped before writing.
FILE_COLUMN = "_file"
LINE_BITS = 32
_LINE_MASK = (1 << LINE_BITS) - 1
#: The read buffer of a file read line by line (an NDJSON file, a part's piece): with
#: Python's 8 KB default, reading the lines of an export costs 3x more (a system call
#: per 8 KB).
LINE_READ_BUFFER = 2**20
#: The name ending of a piece of a Bulk Data part (`pipelines.fhir.bulk`) that holds
#: spans, ``FIRST_ORIGIN\tLAST_ORIGIN\tSTART\tEND`` lines: consecutive lines of one
#: uncompressed file of the export (bytes START to END), read from the file itself.
SPANS_SUFFIX = ".spans"
#: The export's file paths by file number (JSON), beside the parts.
SOURCES_FILE = "sources.json"
#: Bundle types that are read: every one whose entries are resources of record.
BUNDLE_TYPES = frozenset({"document", "collection", "transaction", "batch", "searchset"})
#: The largest input file (bundle) or NDJSON line read, in MB; ``PMLM_MAX_FILE_MB`` overrides.
DEFAULT_MAX_FILE_MB = 512
#: Read order within a unit, so that references resolve in any entry order.
_ORDER = {"Patient": 0, "Encounter": 1, "Medication": 2, "Binary": 2}
_TABLES = {"patients": PATIENTS, "encounters": ENCOUNTERS, "events": EVENTS, "notes": NOTES}


def max_file_bytes() -> int:
    """The size limit of one input file or line (``PMLM_MAX_FILE_MB``, default 512 MB)."""
    raw = os.environ.get("PMLM_MAX_FILE_MB", str(DEFAULT_MAX_FILE_MB))
    try:
        return int(float(raw) * 2**20)
    except ValueError:
        raise ValueError(f"PMLM_MAX_FILE_MB={raw!r} is not a number of megabytes") from None


def origin_name(origin: int, names: list[str]) -> str:
    """``FILE`` (a bundle) or ``FILE:LINE`` (a line of an NDJSON file)."""
    name = names[origin >> LINE_BITS]
    if name.endswith((".ndjson", ".ndjson.gz")):
        return f"{name}:{origin & ((1 << LINE_BITS) - 1)}"
    return name


def quarantine_row(
    where: str, rtype: str | None, rid: str | None, reason: str
) -> dict[str, str | None]:
    """One row of the quarantine table."""
    return {
        "source": SOURCE,
        "source_file": where,
        "resource_type": rtype,
        "resource_id": rid,
        "reason": reason,
    }


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block, on again after it (if it was).

    For blocks that build many objects without cycles (JSON trees as dicts and lists):
    reference counting frees them all the same, and the collector, which a large
    number of new objects sets off again and again, would walk every one of them each
    time. Measured on 200 patients of a Bulk Data export, one process: 37.0 s with the
    collector, 28.8 s without (BENCHMARKS.md, "Bulk Data ingest").

    The block should end when its many objects are gone, not while they are still
    alive: the first collection after it walks every object the block made that is
    still there (a sampling profile found 10% of a worker's time in that one walk when
    the block ended inside a part's reading).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def resource_of(value: Any) -> dict[str, Any] | None:
    """A simdjson object → dict when its type is read, else ``{"resourceType": type}``
    (counted, never turned into Python objects: ~30% of a Synthea bundle)."""
    if not isinstance(value, simdjson.Object):
        return None
    rtype = value.get("resourceType")
    if isinstance(rtype, str) and rtype in RESOURCE_PARSERS:
        resource: dict[str, Any] = value.as_dict()
        return resource
    return {"resourceType": rtype if isinstance(rtype, str) else None}


def bundle_entries(
    parser: simdjson.Parser, raw: bytes
) -> list[tuple[dict[str, Any] | None, str | None]] | str:
    """(resource, fullUrl target) of each entry of a Bundle, or why ``raw`` is not one.

    Raises ValueError (UnicodeDecodeError: not UTF-8) or RuntimeError (simdjson:
    too deep, a number out of range) when ``raw`` is not readable JSON.
    """
    doc = parser.parse(raw)
    if not isinstance(doc, simdjson.Object):
        kind = "list" if isinstance(doc, simdjson.Array) else type(doc).__name__
        return f"not a FHIR Bundle (resourceType {kind!r})"
    rtype = doc.get("resourceType")
    if rtype != "Bundle":
        shown = rtype if rtype is None or isinstance(rtype, str | int | float) else "?"
        return f"not a FHIR Bundle (resourceType {shown!r})"
    btype = doc.get("type")
    if btype is not None and btype not in BUNDLE_TYPES:
        shown = btype if isinstance(btype, str) else type(btype).__name__
        return (
            f"Bundle type {shown!r} is not read: export the current resources as a "
            "document, collection, transaction, batch or searchset bundle, or as Bulk Data"
        )
    entries = doc.get("entry")
    if entries is None:
        return []
    if not isinstance(entries, simdjson.Array):
        return f"Bundle.entry is not a list (a {type(entries).__name__})"
    out: list[tuple[dict[str, Any] | None, str | None]] = []
    for entry in entries:
        if not isinstance(entry, simdjson.Object):
            out.append((None, None))
            continue
        full_url = entry.get("fullUrl")
        out.append((resource_of(entry.get("resource")), reference_target(full_url)))
    return out


def first_bad_byte(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return -1  # simdjson and Python disagree: report no offset rather than a wrong one


class FhirReader:
    """Accumulates rows over many units; one instance per chunk of units."""

    def __init__(self, salt: str | None, names: list[str]) -> None:
        self.salt = salt
        self.names = names
        self.parser = simdjson.Parser()
        self.summary = IngestSummary(source=SOURCE)
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in _TABLES}
        # rows are turned into frames now and then: dicts cost ~10× the memory
        self.parts: dict[str, list[pd.DataFrame]] = {name: [] for name in _TABLES}
        self.quarantine: list[dict[str, Any]] = []
        #: pseudonym → direct identifiers of every Patient read (kept or not): the deny-list
        self.identifiers: dict[str, PatientIdentifiers] = {}
        # Of the current unit: source patient id → pseudonym, encounter id → pseudonym
        # of its patient, supporting resources (references resolve within a unit).
        self.patient_ids: dict[str, str] = {}
        self.encounter_patient: dict[str, str] = {}
        self.filtered_encounters: set[str] = set()
        self.medications: dict[str, Coding] = {}
        self.binaries: dict[str, tuple[str | None, str]] = {}
        self.shared_medications: dict[str, Coding] = {}
        #: a Bulk Data export's files by number (`span_lines`), and where they were read
        self.sources: dict[int, Path] = {}
        self.sources_at: Path | None = None
        self.origin = 0

    # ---------------------------------------------------------------- Context
    def add(self, table: str, row: dict[str, Any]) -> None:
        row[FILE_COLUMN] = self.origin
        self.rows[table].append(row)

    def add_patient(self, source_id: str, row: dict[str, Any]) -> None:
        row["source_file"] = file_id(self.names[self.origin >> LINE_BITS], self.salt)
        row[SOURCE_ID_COLUMN] = source_id
        self.add("patients", row)
        self.patient_ids[source_id] = row["patient_id"]

    def add_encounter(self, encounter_id: str, patient_id: str) -> None:
        self.encounter_patient[encounter_id] = patient_id

    def subject(self, resource: dict[str, Any]) -> str:
        sid = reference_id(resource.get("subject") or resource.get("patient"))
        if sid is None:
            raise Rejected("missing subject/patient reference")
        pid = self.patient_ids.get(sid)
        if pid is None:
            raise Rejected(f"references absent Patient {sid}")
        return pid

    def encounter_of(self, resource: dict[str, Any], patient_id: str) -> str | None:
        ref = resource.get("encounter")
        if ref is None:
            context = resource.get("context")
            if isinstance(context, dict):
                encs = context.get("encounter")
                ref = encs[0] if isinstance(encs, list) and encs else encs
        if ref is None:
            return None
        eid = reference_id(ref)
        if eid is None:
            raise Rejected("malformed encounter reference")
        if eid in self.filtered_encounters:
            raise Filtered("its Encounter was entered in error or cancelled")
        owner = self.encounter_patient.get(eid)
        if owner is None:
            raise Rejected(f"references absent Encounter {eid}")
        if owner != patient_id:
            raise Rejected(f"Encounter {eid} belongs to another patient")
        return eid

    # ---------------------------------------------------------------- quarantine
    def reject(self, origin: int, rtype: str | None, rid: str | None, reason: str) -> None:
        self.quarantine.append(quarantine_row(origin_name(origin, self.names), rtype, rid, reason))

    def reject_file(self, origin: int, reason: str) -> None:
        self.summary.files_quarantined += 1
        self.reject(origin, None, None, reason)

    # ---------------------------------------------------------------- units
    def read_bundle(self, path: Path, number: int) -> None:
        """One bundle file (input file ``number``) as one unit."""
        origin = number << LINE_BITS
        size = path.stat().st_size
        if size > max_file_bytes():
            self.reject_file(
                origin,
                f"file of {size / 2**20:.0f} MB is over the {max_file_bytes() / 2**20:.0f} MB "
                "limit: split it, or raise PMLM_MAX_FILE_MB",
            )
            return
        raw = path.read_bytes()
        try:
            entries = bundle_entries(self.parser, raw)
        except UnicodeDecodeError:
            self.reject_file(origin, f"not UTF-8: invalid byte at offset {first_bad_byte(raw)}")
            return
        except (ValueError, RuntimeError) as exc:  # simdjson: not JSON, too deep, too large
            self.reject_file(origin, f"malformed JSON: {exc}")
            return
        if isinstance(entries, str):
            self.reject_file(origin, entries)
            return
        self.summary.files_read += 1
        self.read_unit(
            [(origin + i + 1, resource, alias) for i, (resource, alias) in enumerate(entries)]
        )

    def load_shared(self, path: Path) -> None:
        """The Medications of a Bulk Data export, which every part may reference."""
        loaded = json.loads(path.read_bytes())
        self.shared_medications = {k: (v[0], v[1], v[2]) for k, v in loaded.items()}

    def read_part(self, path: Path) -> None:
        """One part of a Bulk Data export (`pipelines.fhir.bulk`) as one unit: a file,
        or a folder of pieces read in the order of their names.

        A part holds 16 patients' resources at once (a bundle holds one patient's): its
        caller, `pipelines.fhir.merge.read_chunk`, reads with the cyclic garbage
        collector paused (`collector_paused`)."""
        items: list[tuple[int, dict[str, Any] | None, str | None]] = []
        pieces = sorted(path.iterdir()) if path.is_dir() else [path]
        parse = self.parser.parse
        for piece in pieces:
            if piece.name.endswith(SPANS_SUFFIX):
                for number, raw in self.span_lines(piece):
                    items.append((number, resource_of(parse(raw)), None))
                continue
            with piece.open("rb", buffering=LINE_READ_BUFFER) as handle:
                for line in handle:
                    origin, _, raw = line.partition(b"\t")
                    items.append((int(origin), resource_of(parse(raw)), None))
        self.read_unit(items)

    def span_lines(self, piece: Path) -> Iterator[tuple[int, bytes]]:
        """(origin, line) of each line that the spans of ``piece`` point at, read from
        the export's file; a file that changed since the partition pass is an error."""
        sources = piece.parent.parent / SOURCES_FILE
        if self.sources_at != sources:
            self.sources = {int(k): Path(v) for k, v in json.loads(sources.read_bytes()).items()}
            self.sources_at = sources
        with piece.open("rb") as handle:
            spans = [tuple(map(int, line.split(b"\t"))) for line in handle]
        if not spans:
            return
        source = self.sources[spans[0][0] >> LINE_BITS]
        with source.open("rb", buffering=0) as handle:
            fd = handle.fileno()
            for first, last, start, end in spans:
                lines = os.pread(fd, end - start, start).split(b"\n")
                if lines[-1] == b"":
                    lines.pop()
                if len(lines) != last - first + 1:
                    raise FhirInputError(
                        f"{source} changed while it was ingested (bytes {start}-{end} no "
                        f"longer hold lines {first & _LINE_MASK}-{last & _LINE_MASK}): "
                        "ingest again from an export that nothing is writing to"
                    )
                yield from zip(range(first, last + 1), lines, strict=True)

    def read_unit(self, items: list[tuple[int, dict[str, Any] | None, str | None]]) -> None:
        self.patient_ids.clear()
        self.encounter_patient.clear()
        self.filtered_encounters.clear()
        self.medications = dict(self.shared_medications)
        self.binaries.clear()
        items.sort(
            key=lambda item: _ORDER.get(item[1].get("resourceType", ""), 3) if item[1] else 3
        )
        for origin, resource, alias in items:
            self.origin = origin
            self.read_resource(origin, resource, alias)

    def read_resource(
        self, origin: int, resource: dict[str, Any] | None, alias: str | None
    ) -> None:
        s = self.summary
        s.read += 1
        if resource is None:
            s.quarantined += 1
            self.reject(origin, None, None, "bundle entry without a resource object")
            return
        rtype = resource.get("resourceType")
        parse = RESOURCE_PARSERS.get(rtype) if isinstance(rtype, str) else None
        if parse is None:
            s.skipped_by_type[str(rtype)] += 1
            return
        assert isinstance(rtype, str)
        rid = resource.get("id")
        try:
            if not isinstance(rid, str) or not rid:
                raise Rejected("missing id")
            if rtype == "Patient":  # before parsing: a quarantined Patient's names are denied too
                pid = pseudonym(SOURCE, rid, self.salt)
                merge_identifiers(self.identifiers, {pid: patient_identifiers(resource, self.salt)})
            parse(self, rid, resource)
        except Filtered as why:
            s.skipped_by_reason[f"{rtype} {why}"] += 1
            return
        except Rejected as why:
            s.quarantined += 1
            self.reject(origin, rtype, rid if isinstance(rid, str) else None, str(why))
            return
        except RecursionError:
            s.quarantined += 1
            self.reject(origin, rtype, rid, "nested too deeply to read")
            return
        s.kept += 1
        s.kept_by_type[rtype] += 1
        if alias and alias != rid:  # a bundle's fullUrl that references use instead of the id
            if rid in self.patient_ids:
                self.patient_ids[alias] = self.patient_ids[rid]
            if rid in self.encounter_patient:
                self.encounter_patient[alias] = self.encounter_patient[rid]
            if rid in self.medications:
                self.medications[alias] = self.medications[rid]
            if rid in self.binaries:
                self.binaries[alias] = self.binaries[rid]

    # ---------------------------------------------------------------- tables
    def flush(self) -> None:
        """Move the rows read so far into typed frames."""
        for name, schema in _TABLES.items():
            rows = self.rows[name]
            if rows:
                self.parts[name].append(typed(frame(rows, _columns(name, schema.names))))
                rows.clear()

    def tables(self) -> SourceTables:
        """The tables read so far, with the internal columns."""
        self.flush()

        def concat(name: str) -> pd.DataFrame:
            parts = self.parts[name]
            if not parts:
                return typed(frame([], _columns(name, _TABLES[name].names)))
            return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]

        return SourceTables(
            patients=concat("patients"),
            encounters=concat("encounters"),
            events=concat("events"),
            notes=concat("notes"),
            quarantine=frame(self.quarantine, QUARANTINE.names),
            summary=self.summary,
            identifiers=self.identifiers,
        )


def _columns(name: str, names: list[str]) -> list[str]:
    extra = [FILE_COLUMN, SOURCE_ID_COLUMN] if name == "patients" else [FILE_COLUMN]
    return [*names, *extra]


TIME_COLUMNS = ("start", "end", "time", "end_time", "deceased_time")


def typed(df: pd.DataFrame, names: list[str] | None = None) -> pd.DataFrame:
    """Give time columns the canonical dtype (UTC, microseconds), the origin int64."""
    for col in TIME_COLUMNS:
        if col in df.columns:
            df[col] = pd.to_datetime(df[col], utc=True).astype("datetime64[us, UTC]")
    if "birth_date" in df.columns:
        df["birth_date"] = pd.to_datetime(df["birth_date"]).dt.date
    if FILE_COLUMN in df.columns:
        df[FILE_COLUMN] = df[FILE_COLUMN].astype("int64")
    return df
