"""FHIR R4 source: a folder of Bundles (as Synthea writes them) → canonical tables.

Read resource types: Patient, Encounter, Condition, Procedure, MedicationRequest,
Immunization, Observation, CarePlan, AllergyIntolerance, DocumentReference
(base64 plain-text notes). Every other resource type is counted in
``summary.skipped_by_type``, not an error.

Bad input never stops the run silently and never crashes it without a reason:

- a file that is not UTF-8, not JSON, or not a Bundle → one quarantine row for
  the file (``resource_type`` empty), counted in ``files_quarantined``;
- a resource missing a required field, with an unparsable date, a duplicate id,
  or a reference to a patient or encounter that is absent (or was itself
  quarantined) → one quarantine row with the reason.

References resolve within one file: each Bundle carries the Patient and the
Encounters its resources refer to, as Synthea writes them. A duplicate (an id
already read from an earlier file, or earlier in the same file) is quarantined,
the first occurrence kept, and it still resolves the references of its own
file. So the tables do not depend on how files are grouped for reading: one
reader or many processes, in memory or staged (`pipelines.staged`), give the
same result.

Usage::

    tables = read_fhir_folder(Path("synthea-out/fhir"))
    tables.summary.reconciles()  # True
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, date, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import simdjson

from pipelines.schemas import ENCOUNTERS, EVENTS, NOTES, PATIENTS, QUARANTINE, ROW_ORDER
from pipelines.sources import IngestSummary, SourceTables, frame, pseudonym

SOURCE = "fhir"
T = TypeVar("T")

EVENT_RESOURCES = {
    "Condition": "condition",
    "Procedure": "procedure",
    "MedicationRequest": "medication",
    "Immunization": "immunization",
    "Observation": "observation",
    "CarePlan": "careplan",
    "AllergyIntolerance": "allergy",
}
KIND_RESOURCE = {kind: rtype for rtype, kind in EVENT_RESOURCES.items()}
READ_TYPES = frozenset({"Patient", "Encounter", "DocumentReference", *EVENT_RESOURCES})


class Rejected(Exception):
    """A resource that goes to quarantine; the message is the reason."""


def parse_time(value: Any, what: str) -> datetime:
    """An ISO 8601 date or date-time → aware UTC datetime (dates → midnight UTC)."""
    if not isinstance(value, str) or not value:
        raise Rejected(f"missing {what}")
    try:
        if len(value) == 10:
            parsed = datetime.combine(date.fromisoformat(value), datetime.min.time())
        else:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Rejected(f"unparsable {what} {value!r}") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def reference_id(ref: Any) -> str | None:
    """The target id of a FHIR Reference (``urn:uuid:X`` or ``Type/X``), or None."""
    if not isinstance(ref, dict):
        return None
    value = ref.get("reference")
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("urn:uuid:"):
        return value[9:]
    return value.rsplit("/", 1)[-1]


def first_coding(concept: Any, what: str) -> tuple[str | None, str | None, str | None]:
    """(system, code, display) of a CodeableConcept's first coding; falls back to its text."""
    if not isinstance(concept, dict):
        raise Rejected(f"missing {what}")
    codings = concept.get("coding")
    if isinstance(codings, list) and codings and isinstance(codings[0], dict):
        c = codings[0]
        return c.get("system"), c.get("code"), c.get("display") or concept.get("text")
    if concept.get("text"):
        return None, None, concept["text"]
    raise Rejected(f"{what} has no coding and no text")


def _bundle_resources(parser: simdjson.Parser, raw: bytes) -> list[dict[str, Any] | None] | str:
    """The resources of a Bundle, in entry order, or why ``raw`` is not a Bundle.

    A resource of a type that is read becomes a dict; of another type, only
    ``{"resourceType": type}`` (it is counted, not read: ~30% of a Synthea file
    that is never turned into Python objects); an entry without a resource
    object, None. Raises ValueError (UnicodeDecodeError) when ``raw`` is not
    JSON (not UTF-8). simdjson's views of the document live only in this call,
    so the parser can be reused.
    """
    doc = parser.parse(raw)
    if not isinstance(doc, simdjson.Object):
        kind = "list" if isinstance(doc, simdjson.Array) else type(doc).__name__
        return f"not a FHIR Bundle (resourceType {kind!r})"
    rtype = doc.get("resourceType")
    if rtype != "Bundle":
        shown = rtype if rtype is None or isinstance(rtype, str | int | float) else "?"
        return f"not a FHIR Bundle (resourceType {shown!r})"
    entries = doc.get("entry")
    if entries is None:
        return []
    if not isinstance(entries, simdjson.Array):
        return f"Bundle.entry is not a list (a {type(entries).__name__})"
    out: list[dict[str, Any] | None] = []
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, simdjson.Object) else None
        if not isinstance(resource, simdjson.Object):
            out.append(None)
            continue
        rtype = resource.get("resourceType")
        if isinstance(rtype, str) and rtype in READ_TYPES:
            out.append(resource.as_dict())
        else:
            out.append({"resourceType": rtype if isinstance(rtype, str) else None})
    return out


def _first_bad_byte(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return -1  # simdjson and Python disagree: report no offset rather than a wrong one


class _FhirReader:
    """Accumulates rows over many bundles; one instance per ingest."""

    def __init__(self, salt: str | None) -> None:
        self.salt = salt
        self.parser = simdjson.Parser()
        self.summary = IngestSummary(source=SOURCE)
        self.patients: list[dict[str, Any]] = []
        self.encounters: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.notes: list[dict[str, Any]] = []
        # rows are turned into frames after each file: dicts cost ~10× the memory
        self.parts: dict[str, list[pd.DataFrame]] = {
            "patients": [],
            "encounters": [],
            "events": [],
            "notes": [],
        }
        self.quarantine: list[dict[str, Any]] = []
        self.seen_ids: set[tuple[str, str]] = set()
        # Of the current file: source patient id → pseudonym, source encounter id →
        # pseudonym of its patient (references resolve within a file).
        self.patient_ids: dict[str, str] = {}
        self.encounter_patient: dict[str, str] = {}
        # the number of the file being read (its place in the folder); `end_file`
        # notes how many rows it gave, so that rows can name their file (duplicates)
        self.file_number = 0
        self.part_files: dict[str, list[tuple[int, int]]] = {name: [] for name in self.parts}
        self.counted = dict.fromkeys(self.parts, 0)  # rows not flushed yet, by table
        self.patient_source_ids: list[str] = []  # one per patient row (duplicates across files)

    def reject(self, file: str, rtype: str | None, rid: str | None, reason: str) -> None:
        self.quarantine.append(
            {
                "source": SOURCE,
                "source_file": file,
                "resource_type": rtype,
                "resource_id": rid,
                "reason": reason,
            }
        )

    def read_file(self, path: Path) -> None:
        name = path.name
        raw = path.read_bytes()
        try:
            resources = _bundle_resources(self.parser, raw)
        except UnicodeDecodeError:
            self.summary.files_quarantined += 1
            where = _first_bad_byte(raw)
            self.reject(name, None, None, f"not UTF-8: invalid byte at offset {where}")
            return
        except ValueError as exc:  # simdjson: not JSON
            self.summary.files_quarantined += 1
            self.reject(name, None, None, f"malformed JSON: {exc}")
            return
        if isinstance(resources, str):
            self.summary.files_quarantined += 1
            self.reject(name, None, None, resources)
            return
        self.summary.files_read += 1
        self.patient_ids.clear()
        self.encounter_patient.clear()
        # Patients and encounters first, so that references resolve in any entry order.
        order = {"Patient": 0, "Encounter": 1}
        resources.sort(key=lambda r: order.get(r.get("resourceType", ""), 2) if r else 2)
        for resource in resources:
            self.summary.read += 1
            if resource is None:
                self.summary.quarantined += 1
                self.reject(name, None, None, "bundle entry without a resource object")
                continue
            rtype = resource.get("resourceType")
            if rtype not in READ_TYPES:
                self.summary.skipped_by_type[str(rtype)] += 1
                continue
            rid = resource.get("id")
            try:
                if not isinstance(rid, str) or not rid:
                    raise Rejected("missing id")
                if (rtype, rid) in self.seen_ids:
                    self.resolve_duplicate(rtype, rid, resource)
                    raise Rejected(f"duplicate {rtype} id (first occurrence kept)")
                self.read_resource(name, rtype, rid, resource)
            except Rejected as why:
                self.summary.quarantined += 1
                self.reject(name, rtype, rid if isinstance(rid, str) else None, str(why))
                continue
            self.seen_ids.add((rtype, rid))
            self.summary.kept += 1
            self.summary.kept_by_type[rtype] += 1

    def resolve_duplicate(self, rtype: str, rid: str, r: dict[str, Any]) -> None:
        """A duplicate Patient or Encounter still resolves its own file's references,
        as it does when the first occurrence was read by another process."""
        if rtype == "Patient":
            self.patient_ids[rid] = pseudonym(SOURCE, rid, self.salt)
        elif rtype == "Encounter":
            sid = reference_id(r.get("subject") or r.get("patient"))
            pid = self.patient_ids.get(sid) if sid is not None else None
            if pid is not None:  # else it resolves nothing, as when read first
                self.encounter_patient[rid] = pid

    def subject(self, resource: dict[str, Any]) -> str:
        ref = resource.get("subject") or resource.get("patient")
        sid = reference_id(ref)
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
                ref = encs[0] if isinstance(encs, list) and encs else None
        if ref is None:
            return None
        eid = reference_id(ref)
        if eid is None:
            raise Rejected("malformed encounter reference")
        owner = self.encounter_patient.get(eid)
        if owner is None:
            raise Rejected(f"references absent Encounter {eid}")
        if owner != patient_id:
            raise Rejected(f"Encounter {eid} belongs to another patient")
        return eid

    def read_resource(self, file: str, rtype: str, rid: str, r: dict[str, Any]) -> None:
        if rtype == "Patient":
            self.read_patient(file, rid, r)
        elif rtype == "Encounter":
            self.read_encounter(rid, r)
        elif rtype == "DocumentReference":
            self.read_note(rid, r)
        else:
            self.read_event(rtype, rid, r)

    def read_patient(self, file: str, rid: str, r: dict[str, Any]) -> None:
        birth = r.get("birthDate")
        birth_date = parse_time(birth, "birthDate").date() if birth is not None else None
        deceased = r.get("deceasedDateTime")
        race = ethnicity = None
        for ext in r.get("extension") or []:
            url = ext.get("url", "") if isinstance(ext, dict) else ""
            if url.endswith("us-core-race") or url.endswith("us-core-ethnicity"):
                text = next(
                    (
                        e.get("valueString")
                        for e in ext.get("extension") or []
                        if isinstance(e, dict) and e.get("url") == "text"
                    ),
                    None,
                )
                if url.endswith("race"):
                    race = text
                else:
                    ethnicity = text
        pid = pseudonym(SOURCE, rid, self.salt)
        self.patients.append(
            {
                "patient_id": pid,
                "birth_date": birth_date,
                "sex": r.get("gender"),
                "deceased_time": parse_time(deceased, "deceasedDateTime") if deceased else None,
                "race": race,
                "ethnicity": ethnicity,
                "source": SOURCE,
                "source_file": file,
            }
        )
        self.patient_ids[rid] = pid
        self.patient_source_ids.append(rid)

    def read_encounter(self, rid: str, r: dict[str, Any]) -> None:
        pid = self.subject(r)
        period = r.get("period")
        if not isinstance(period, dict):
            raise Rejected("missing period")
        start = parse_time(period.get("start"), "period.start")
        end = parse_time(period["end"], "period.end") if period.get("end") else start
        if end < start:
            raise Rejected(f"period.end {period.get('end')!r} is before period.start")
        types = r.get("type")
        tsys = tcode = tdisp = None
        if isinstance(types, list) and types:
            tsys, tcode, tdisp = first_coding(types[0], "type")
        klass = r.get("class")
        reasons = r.get("reasonCode")
        reason = None
        if isinstance(reasons, list) and reasons and isinstance(reasons[0], dict):
            reason = reasons[0].get("text") or first_coding(reasons[0], "reasonCode")[2]
        self.encounters.append(
            {
                "encounter_id": rid,
                "patient_id": pid,
                "start": start,
                "end": end,
                "class_code": klass.get("code") if isinstance(klass, dict) else None,
                "type_system": tsys,
                "type_code": tcode,
                "type_display": tdisp,
                "reason_display": reason,
            }
        )
        self.encounter_patient[rid] = pid

    def read_note(self, rid: str, r: dict[str, Any]) -> None:
        pid = self.subject(r)
        eid = self.encounter_of(r, pid)
        contents = r.get("content")
        if not isinstance(contents, list) or not contents:
            raise Rejected("missing content")
        attachment = contents[0].get("attachment") if isinstance(contents[0], dict) else None
        data = attachment.get("data") if isinstance(attachment, dict) else None
        if not isinstance(data, str):
            raise Rejected("missing content[0].attachment.data")
        try:
            text = base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as exc:
            raise Rejected(f"note text is not base64-encoded UTF-8: {exc}") from None
        when = r.get("date")
        if when is None:
            ctx = r.get("context")
            period = ctx.get("period") if isinstance(ctx, dict) else None
            when = period.get("start") if isinstance(period, dict) else None
        ntype = None
        if isinstance(r.get("type"), dict):
            ntype = first_coding(r["type"], "type")[2]
        self.notes.append(
            {
                "note_id": rid,
                "patient_id": pid,
                "encounter_id": eid,
                "time": parse_time(when, "date"),
                "note_type": ntype,
                "text": text,
            }
        )

    def read_event(self, rtype: str, rid: str, r: dict[str, Any]) -> None:
        pid = self.subject(r)
        eid = self.encounter_of(r, pid)
        kind = EVENT_RESOURCES[rtype]
        end_time = None
        value: float | None = None
        value_text = unit = None
        extra: list[dict[str, Any]] = []
        if rtype == "Condition":
            system, code, display = first_coding(r.get("code"), "code")
            time = parse_time(r.get("onsetDateTime") or r.get("recordedDate"), "onsetDateTime")
            if r.get("abatementDateTime"):
                end_time = parse_time(r["abatementDateTime"], "abatementDateTime")
        elif rtype == "Procedure":
            system, code, display = first_coding(r.get("code"), "code")
            performed = r.get("performedDateTime")
            if performed is None and isinstance(r.get("performedPeriod"), dict):
                performed = r["performedPeriod"].get("start")
                if r["performedPeriod"].get("end"):
                    end_time = parse_time(r["performedPeriod"]["end"], "performedPeriod.end")
            time = parse_time(performed, "performedDateTime")
        elif rtype == "MedicationRequest":
            system, code, display = first_coding(
                r.get("medicationCodeableConcept"), "medicationCodeableConcept"
            )
            time = parse_time(r.get("authoredOn"), "authoredOn")
        elif rtype == "Immunization":
            system, code, display = first_coding(r.get("vaccineCode"), "vaccineCode")
            time = parse_time(r.get("occurrenceDateTime"), "occurrenceDateTime")
        elif rtype == "Observation":
            system, code, display = first_coding(r.get("code"), "code")
            time = parse_time(r.get("effectiveDateTime") or r.get("issued"), "effectiveDateTime")
            value, value_text, unit = _observation_value(r)
            for i, comp in enumerate(r.get("component") or []):
                if not isinstance(comp, dict):
                    continue
                csys, ccode, cdisp = first_coding(comp.get("code"), "component.code")
                cval, ctext, cunit = _observation_value(comp)
                extra.append(
                    {
                        "event_id": f"{rid}#{i}",
                        "code_system": csys,
                        "code": ccode,
                        "display": cdisp,
                        "value": cval,
                        "value_text": ctext,
                        "unit": cunit,
                    }
                )
        elif rtype == "CarePlan":
            categories = [
                c for c in r.get("category") or [] if isinstance(c, dict) and c.get("coding")
            ]
            coded = [c for c in categories if c["coding"][0].get("code") != "assess-plan"]
            if not coded:
                raise Rejected("CarePlan has no coded category")
            system, code, display = first_coding(coded[0], "category")
            period: dict[str, Any] = r["period"] if isinstance(r.get("period"), dict) else {}
            time = parse_time(period.get("start"), "period.start")
            if period.get("end"):
                end_time = parse_time(period["end"], "period.end")
            for i, act in enumerate(r.get("activity") or []):
                detail = act.get("detail") if isinstance(act, dict) else None
                if isinstance(detail, dict) and detail.get("code"):
                    asys, acode, adisp = first_coding(detail["code"], "activity.detail.code")
                    extra.append(
                        {
                            "event_id": f"{rid}#a{i}",
                            "code_system": asys,
                            "code": acode,
                            "display": adisp,
                            "value": None,
                            "value_text": None,
                            "unit": None,
                        }
                    )
        else:  # AllergyIntolerance
            system, code, display = first_coding(r.get("code"), "code")
            time = parse_time(r.get("recordedDate") or r.get("onsetDateTime"), "recordedDate")
        base = {
            "patient_id": pid,
            "encounter_id": eid,
            "time": time,
            "end_time": end_time,
            "kind": kind,
        }
        self.events.append(
            {
                **base,
                "event_id": rid,
                "code_system": system,
                "code": code,
                "display": display,
                "value": value,
                "value_text": value_text,
                "unit": unit,
            }
        )
        self.events.extend({**base, **row} for row in extra)

    def flush(self) -> None:
        """Move the rows read so far into typed frames."""
        for name, schema in (
            ("patients", PATIENTS),
            ("encounters", ENCOUNTERS),
            ("events", EVENTS),
            ("notes", NOTES),
        ):
            rows: list[dict[str, Any]] = getattr(self, name)
            if rows:
                self.parts[name].append(typed(frame(rows, schema.names), schema.names))
                rows.clear()
            self.counted[name] = 0

    def end_file(self) -> None:
        """Note how many rows of each table the file just read gave."""
        for name in self.parts:
            n = len(getattr(self, name)) - self.counted[name]
            if n:
                self.part_files[name].append((self.file_number, n))
                self.counted[name] += n

    def tables(self, with_files: bool = False) -> SourceTables:
        """The tables read so far; ``with_files`` adds a ``_file`` column (the file number)."""
        self.flush()

        def concat(name: str, names: list[str]) -> pd.DataFrame:
            parts = self.parts[name]
            if not parts:
                df = typed(frame([], names), names)
            else:
                df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
            if with_files:
                counts = self.part_files[name]
                df[FILE_COLUMN] = np.repeat(
                    np.array([f for f, _ in counts], dtype=np.int32),
                    np.array([n for _, n in counts], dtype=np.int64),
                )
                if name == "patients":
                    df[SOURCE_ID_COLUMN] = pd.Series(self.patient_source_ids, dtype=object)
            return df

        return SourceTables(
            patients=concat("patients", PATIENTS.names),
            encounters=concat("encounters", ENCOUNTERS.names),
            events=concat("events", EVENTS.names),
            notes=concat("notes", NOTES.names),
            quarantine=frame(self.quarantine, QUARANTINE.names),
            summary=self.summary,
        )


def _observation_value(r: dict[str, Any]) -> tuple[float | None, str | None, str | None]:
    q = r.get("valueQuantity")
    if isinstance(q, dict) and isinstance(q.get("value"), int | float):
        return float(q["value"]), None, q.get("unit") or q.get("code")
    cc = r.get("valueCodeableConcept")
    if isinstance(cc, dict):
        try:
            return None, first_coding(cc, "valueCodeableConcept")[2], None
        except Rejected:
            return None, None, None
    if isinstance(r.get("valueString"), str):
        return None, r["valueString"], None
    return None, None, None


TIME_COLUMNS = ("start", "end", "time", "end_time", "deceased_time")


def typed(df: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Give time columns the canonical dtype (UTC, microseconds) and sort stably."""
    for col in TIME_COLUMNS:
        if col in df.columns:
            df[col] = pd.to_datetime(df[col], utc=True).astype("datetime64[us, UTC]")
    if "birth_date" in df.columns:
        df["birth_date"] = pd.to_datetime(df["birth_date"]).dt.date
    return df


def bundle_files(folder: Path) -> list[Path]:
    """The JSON files of a Synthea output folder (``DIR`` or ``DIR/fhir``), sorted."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist: give a folder of FHIR R4 bundles")
    if folder.is_file():
        return [folder]
    if (folder / "fhir").is_dir():
        folder = folder / "fhir"
    files = sorted(p for p in folder.glob("*.json") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.json FHIR bundles")
    return files


#: Internal column: the number of the file a row was read from (dropped before writing).
FILE_COLUMN = "_file"


def read_chunk(paths: list[Path], salt: str | None, first_file: int = 0) -> SourceTables:
    """Read ``paths`` (files number ``first_file``, ``first_file + 1``, …) with one reader.

    The record tables carry ``FILE_COLUMN``; duplicates within the chunk are
    already quarantined, duplicates across chunks are the caller's.
    """
    reader = _FhirReader(salt)
    for i, path in enumerate(paths):
        reader.file_number = first_file + i
        reader.read_file(path)
        reader.end_file()
        if (i + 1) % FLUSH_FILES == 0:
            reader.flush()  # dict rows cost ~10× the memory of a frame
    return reader.tables(with_files=True)


#: Files read between two conversions of rows into frames (memory against speed).
FLUSH_FILES = 4


#: The record tables' row order (`schemas.ROW_ORDER`).
SORT_KEYS: dict[str, list[str]] = {
    name: ROW_ORDER[name] for name in ("patients", "encounters", "events", "notes", "quarantine")
}


def sorted_tables(t: SourceTables) -> SourceTables:
    """Events' ``recorded_time``, and the canonical row order (by patient and time),
    so that reruns give identical files. Every source reader ends with this.

    ``t`` is updated in place and returned: each table is replaced by its sorted
    copy one at a time, so at most one extra copy is alive (memory).
    """
    events = t.events
    recorded = events["time"].astype("datetime64[us, UTC]")
    if len(events):
        start_of = dict(zip(t.encounters["encounter_id"], t.encounters["start"], strict=True))
        starts = pd.to_datetime(events["encounter_id"].map(start_of), utc=True).astype(
            "datetime64[us, UTC]"
        )
        recorded = recorded.where(starts.isna() | (recorded >= starts), starts)
    events["recorded_time"] = recorded
    del events, recorded
    for name in SORT_KEYS:
        df: pd.DataFrame = getattr(t, name)
        setattr(t, name, None)
        df = df.sort_values(SORT_KEYS[name], kind="stable", na_position="first")
        setattr(t, name, df.reset_index(drop=True))
    return t


def read_fhir_folder(
    folder: Path, salt: str | None = None, workers: int | None = None
) -> SourceTables:
    """Read every bundle of ``folder`` into record-level canonical tables, in memory.

    Bundles are read in chunks of ``CHUNK_FILES`` by ``workers`` processes
    (default: the number of CPUs; 1 reads in this process); the result does not
    depend on either. For a large cohort, `pipelines.staged.ingest_fhir_staged`
    writes a workspace without holding every table in memory.
    """
    files = bundle_files(folder)
    parts = map_chunks(read_chunk, file_chunks(files), salt, workers=workers)
    return _merge(parts, [p.name for p in files])


#: Bundles per task of a reader process (~3 MB each as Synthea writes them).
CHUNK_FILES = 16


def file_chunks(files: list[Path], size: int | None = None) -> list[tuple[int, list[Path]]]:
    """Contiguous chunks of ``files`` as (number of the first file, paths)."""
    size = size or CHUNK_FILES
    return [(i, files[i : i + size]) for i in range(0, len(files), size)]


def map_chunks(
    fn: Callable[..., T],
    chunks: list[tuple[int, list[Path]]],
    *args: Any,
    workers: int | None,
    progress: Callable[[int, int], None] | None = None,
) -> list[T]:
    """``fn(paths, *args, first_file)`` for every chunk, in order, in ``workers`` processes.

    Chunks are small and handed out one at a time, so a worker holds one chunk's
    tables at a time (memory). With one worker or one chunk, runs here.
    ``progress(files_done, files)`` is called as each chunk's result comes back.
    """
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    total = sum(len(paths) for _, paths in chunks)
    results: list[T] = []
    done = 0

    def collect(result: T, files: int) -> None:
        nonlocal done
        results.append(result)
        done += files
        if progress is not None:
            progress(done, total)

    if workers <= 1:
        for first, paths in chunks:
            collect(fn(paths, *args, first), len(paths))
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        columns = list(zip(*[(paths, *args, first) for first, paths in chunks], strict=True))
        for (_, paths), result in zip(chunks, pool.map(fn, *columns), strict=True):
            collect(result, len(paths))
    return results


#: Record tables: id column and FHIR resource type (None: events, from their kind).
ID_COLUMNS: dict[str, tuple[str, str | None]] = {
    "patients": ("patient_id", "Patient"),
    "encounters": ("encounter_id", "Encounter"),
    "notes": ("note_id", "DocumentReference"),
    "events": ("event_id", None),
}
SOURCE_ID_COLUMN = "_source_id"


def quarantine_duplicates(
    name: str, rows: pd.DataFrame, file_names: list[str], summary: IngestSummary
) -> list[dict[str, Any]]:
    """Quarantine rows for ``rows`` of table ``name``, later occurrences of ids read
    from an earlier file by another reader; ``summary`` moves them from kept to
    quarantined. Gives the rows a single reader would have written.
    """
    key, rtype = ID_COLUMNS[name]
    # the components (#n) of one resource share its quarantine row
    ids = rows[SOURCE_ID_COLUMN] if name == "patients" else rows[key].str.split("#").str[0]
    found = pd.DataFrame(
        {
            "id": ids.to_numpy(dtype=object),
            "file": rows[FILE_COLUMN].to_numpy(),
            "type": rows["kind"].map(KIND_RESOURCE).to_numpy(dtype=object)
            if rtype is None
            else rtype,
        }
    ).drop_duplicates(["id", "file"])
    out = []
    for rid, number, etype in zip(found["id"], found["file"], found["type"], strict=True):
        summary.kept_by_type[etype] -= 1
        out.append(
            {
                "source": SOURCE,
                "source_file": file_names[number],
                "resource_type": etype,
                "resource_id": rid,
                "reason": f"duplicate {etype} id (first occurrence kept)",
            }
        )
    summary.kept -= len(out)
    summary.quarantined += len(out)
    return out


def merge_summaries(summaries: list[IngestSummary]) -> IngestSummary:
    summary = IngestSummary(source=SOURCE)
    for ps in summaries:
        summary.files_read += ps.files_read
        summary.files_quarantined += ps.files_quarantined
        summary.read += ps.read
        summary.kept += ps.kept
        summary.quarantined += ps.quarantined
        summary.skipped_by_type.update(ps.skipped_by_type)
        summary.kept_by_type.update(ps.kept_by_type)
    return summary


def _merge(parts: list[SourceTables], file_names: list[str]) -> SourceTables:
    summary = merge_summaries([p.summary for p in parts])
    merged = {}
    for name in ("patients", "encounters", "events", "notes", "quarantine"):
        merged[name] = pd.concat([getattr(p, name) for p in parts], ignore_index=True)
        for p in parts:  # free each chunk's copy as soon as it is merged
            setattr(p, name, None)
    # Ids repeated across chunks: keep the first, quarantine the rest.
    extra: list[dict[str, Any]] = []
    for name, (key, _) in ID_COLUMNS.items():
        df = merged[name]
        dup = df[key].duplicated(keep="first")
        if dup.any():
            extra.extend(quarantine_duplicates(name, df[dup], file_names, summary))
            df = df[~dup].reset_index(drop=True)
        merged[name] = df.drop(columns=[FILE_COLUMN, SOURCE_ID_COLUMN], errors="ignore")
    if extra:
        merged["quarantine"] = pd.concat(
            [merged["quarantine"], pd.DataFrame(extra, columns=QUARANTINE.names)],
            ignore_index=True,
        )
    tables = SourceTables(summary=summary, **merged)
    del merged, parts
    return sorted_tables(tables)
