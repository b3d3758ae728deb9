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

Usage::

    tables = read_fhir_folder(Path("synthea-out/fhir"))
    tables.summary.reconciles()  # True
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, date, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from pipelines.schemas import ENCOUNTERS, EVENTS, NOTES, PATIENTS, QUARANTINE
from pipelines.sources import IngestSummary, SourceTables, frame, pseudonym

SOURCE = "fhir"

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


def _iter_bundle_resources(bundle: dict[str, Any]) -> Iterator[dict[str, Any] | None]:
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        yield resource if isinstance(resource, dict) else None


class _FhirReader:
    """Accumulates rows over many bundles; one instance per ingest."""

    def __init__(self, salt: str | None) -> None:
        self.salt = salt
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
        # source patient id → pseudonym, source encounter id → (pseudonym patient id)
        self.patient_ids: dict[str, str] = {}
        self.encounter_patient: dict[str, str] = {}

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
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.summary.files_quarantined += 1
            self.reject(name, None, None, f"not UTF-8: invalid byte at offset {exc.start}")
            return
        try:
            bundle = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self.summary.files_quarantined += 1
            self.reject(name, None, None, f"malformed JSON: {exc}")
            return
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            kind = bundle.get("resourceType") if isinstance(bundle, dict) else type(bundle).__name__
            self.summary.files_quarantined += 1
            self.reject(name, None, None, f"not a FHIR Bundle (resourceType {kind!r})")
            return
        self.summary.files_read += 1
        resources = list(_iter_bundle_resources(bundle))
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
                    raise Rejected(f"duplicate {rtype} id (first occurrence kept)")
                self.read_resource(name, rtype, rid, resource)
            except Rejected as why:
                self.summary.quarantined += 1
                self.reject(name, rtype, rid if isinstance(rid, str) else None, str(why))
                continue
            self.seen_ids.add((rtype, rid))
            self.summary.kept += 1
            self.summary.kept_by_type[rtype] += 1

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

    def tables(self) -> SourceTables:
        self.flush()

        def concat(name: str, names: list[str]) -> pd.DataFrame:
            parts = self.parts[name]
            if not parts:
                return typed(frame([], names), names)
            return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]

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


def _read_chunk(paths: list[Path], salt: str | None) -> SourceTables:
    reader = _FhirReader(salt)
    for path in paths:
        reader.read_file(path)
        reader.flush()
    return reader.tables()


SORT_KEYS: dict[str, list[str]] = {
    "patients": ["patient_id"],
    "encounters": ["patient_id", "start", "encounter_id"],
    "events": ["patient_id", "time", "event_id"],
    "notes": ["patient_id", "time", "note_id"],
    "quarantine": ["source_file", "resource_type", "resource_id", "reason"],
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
    """Read every bundle of ``folder`` into record-level canonical tables.

    Each Bundle must carry the Patient and Encounters its resources refer to
    (as Synthea writes them). With ``workers > 1`` bundles are read in that
    many processes (default: the number of CPUs); the result is the same.
    Duplicate ids across files are quarantined here, after the merge.
    """
    files = bundle_files(folder)
    workers = min(workers or os.cpu_count() or 1, len(files))
    if workers <= 1 or len(files) < 8:
        return sorted_tables(_read_chunk(files, salt))
    # Small contiguous chunks, merged in file order: a worker holds one chunk's
    # tables at a time (memory), and the first occurrence of a duplicate id wins.
    chunks = [files[i : i + CHUNK_FILES] for i in range(0, len(files), CHUNK_FILES)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(_read_chunk, chunks, [salt] * len(chunks)))
    return _merge(parts)


#: Bundles per task of a reader process (~3 MB each as Synthea writes them).
CHUNK_FILES = 16


def _merge(parts: list[SourceTables]) -> SourceTables:
    summary = IngestSummary(source=SOURCE)
    for part in parts:
        ps = part.summary
        summary.files_read += ps.files_read
        summary.files_quarantined += ps.files_quarantined
        summary.read += ps.read
        summary.kept += ps.kept
        summary.quarantined += ps.quarantined
        summary.skipped_by_type.update(ps.skipped_by_type)
        summary.kept_by_type.update(ps.kept_by_type)
    merged = {}
    for name in ("patients", "encounters", "events", "notes", "quarantine"):
        merged[name] = pd.concat([getattr(p, name) for p in parts], ignore_index=True)
        for p in parts:  # free each chunk's copy as soon as it is merged
            setattr(p, name, None)
    # Ids repeated across chunks: keep the first, quarantine the rest.
    extra_quarantine: list[dict[str, Any]] = []
    for name, key, rtype in (
        ("patients", "patient_id", "Patient"),
        ("encounters", "encounter_id", "Encounter"),
        ("notes", "note_id", "DocumentReference"),
        ("events", "event_id", None),
    ):
        df = merged[name]
        dup = df[key].duplicated(keep="first")
        if dup.any():
            roots = df.loc[dup, key].str.split("#").str[0]
            if name != "events":
                summary.kept_by_type[str(rtype)] -= len(roots)
                extra_quarantine.extend(
                    {
                        "source": SOURCE,
                        "source_file": "(several files)",
                        "resource_type": rtype,
                        "resource_id": rid,
                        "reason": f"duplicate {rtype} id (first occurrence kept)",
                    }
                    for rid in roots
                )
            else:
                # the components (#n) of one resource share its quarantine row
                kinds = df.loc[dup, "kind"]
                firsts = ~pd.Series(roots.to_numpy()).duplicated().to_numpy()
                for rid, kind, first in zip(roots, kinds, firsts, strict=True):
                    if first:
                        etype = KIND_RESOURCE[kind]
                        summary.kept_by_type[etype] -= 1
                        extra_quarantine.append(
                            {
                                "source": SOURCE,
                                "source_file": "(several files)",
                                "resource_type": etype,
                                "resource_id": rid,
                                "reason": f"duplicate {etype} id (first occurrence kept)",
                            }
                        )
            merged[name] = df[~dup].reset_index(drop=True)
    if extra_quarantine:
        summary.kept -= len(extra_quarantine)
        summary.quarantined += len(extra_quarantine)
        merged["quarantine"] = pd.concat(
            [merged["quarantine"], pd.DataFrame(extra_quarantine, columns=QUARANTINE.names)],
            ignore_index=True,
        )
    tables = SourceTables(summary=summary, **merged)
    del merged, parts, df
    return sorted_tables(tables)
