"""One parser per FHIR resource type, behind a registry (`RESOURCE_PARSERS`).

A parser reads one resource into rows of the canonical tables through a
`Context` (the reader: it resolves references and collects rows). It raises
`Rejected` (quarantine, with the reason) or `Filtered` (a resource that is
valid but not a fact: entered in error, refuted, cancelled, not done; counted
in ``summary.skipped_by_reason``). To read a new resource type, write a
function and decorate it with ``@parser("Type")``; for a new clinical event
type, ``@event_parser("Type", "kind")``.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pipelines.fhir.values import (
    Coding,
    Rejected,
    all_codings,
    as_dict,
    as_list,
    best_coding,
    code_text,
    has_code,
    parse_time,
    reference_target,
    text,
)
from pipelines.sources import pseudonym

SOURCE = "fhir"


class Filtered(Exception):
    """A valid resource that records no fact (its status says so); the message says why."""


class Context(Protocol):
    """What a parser needs from the reader."""

    salt: str | None
    medications: dict[str, Coding]
    binaries: dict[str, tuple[str | None, str]]
    filtered_encounters: set[str]

    def subject(self, resource: dict[str, Any]) -> str: ...
    def encounter_of(self, resource: dict[str, Any], patient_id: str) -> str | None: ...
    def add(self, table: str, row: dict[str, Any]) -> None: ...
    def add_patient(self, source_id: str, row: dict[str, Any]) -> None: ...
    def add_encounter(self, encounter_id: str, patient_id: str) -> None: ...


ResourceParser = Callable[[Context, str, dict[str, Any]], None]
#: FHIR resource type → its parser. Every other type is counted as skipped.
RESOURCE_PARSERS: dict[str, ResourceParser] = {}
#: Event resource type → ``events.kind``.
EVENT_RESOURCES: dict[str, str] = {}


def parser(rtype: str) -> Callable[[ResourceParser], ResourceParser]:
    def register(fn: ResourceParser) -> ResourceParser:
        RESOURCE_PARSERS[rtype] = fn
        return fn

    return register


def optional_text(r: dict[str, Any], key: str) -> str | None:
    """A string field, absent → None; another type is damage (Rejected)."""
    value = r.get(key)
    if value is None or isinstance(value, str):
        return value or None
    raise Rejected(f"{key} is not a string (a {type(value).__name__})")


def status_filter(r: dict[str, Any], excluded: frozenset[str]) -> None:
    """Filtered when ``status`` is one of ``excluded``."""
    status = r.get("status")
    if isinstance(status, str) and status in excluded:
        raise Filtered(f"status {status}")


def verification_filter(r: dict[str, Any]) -> None:
    """Filtered when ``verificationStatus`` is entered-in-error or refuted."""
    for code in ("entered-in-error", "refuted"):
        if has_code(r.get("verificationStatus"), frozenset({code})):
            raise Filtered(f"verificationStatus {code}")


# ------------------------------------------------------------------ patients and visits


@parser("Patient")
def read_patient(ctx: Context, rid: str, r: dict[str, Any]) -> None:
    birth = r.get("birthDate")
    birth_date = parse_time(birth, "birthDate").date() if birth is not None else None
    deceased = r.get("deceasedDateTime")
    race = ethnicity = None
    for ext in as_list(r.get("extension"), "extension"):
        url = text(ext.get("url")) if isinstance(ext, dict) else None
        if url is None or not url.endswith(("us-core-race", "us-core-ethnicity")):
            continue
        inner = as_list(ext.get("extension"), "extension.extension")
        label = next(
            (
                text(e.get("valueString"))
                for e in inner
                if isinstance(e, dict) and e.get("url") == "text"
            ),
            None,
        )
        if url.endswith("race"):
            race = label
        else:
            ethnicity = label
    ctx.add_patient(
        rid,
        {
            "patient_id": pseudonym(SOURCE, rid, ctx.salt),
            "birth_date": birth_date,
            "sex": optional_text(r, "gender"),
            "deceased_time": parse_time(deceased, "deceasedDateTime") if deceased else None,
            "race": race,
            "ethnicity": ethnicity,
            "source": SOURCE,
        },
    )


_ENCOUNTER_EXCLUDED = frozenset({"entered-in-error", "cancelled"})


@parser("Encounter")
def read_encounter(ctx: Context, rid: str, r: dict[str, Any]) -> None:
    pid = ctx.subject(r)
    if isinstance(r.get("status"), str) and r["status"] in _ENCOUNTER_EXCLUDED:
        ctx.filtered_encounters.add(rid)
        raise Filtered(f"status {r['status']}")
    period = as_dict(r.get("period"), "period")
    if period is None:
        raise Rejected("missing period")
    start = parse_time(period.get("start"), "period.start")
    end = parse_time(period["end"], "period.end") if period.get("end") else start
    if end < start:
        raise Rejected(f"period.end {period.get('end')!r} is before period.start")
    types = as_list(r.get("type"), "type")
    tsys, tcode, tdisp = best_coding(types[0], "type") if types else (None, None, None)
    klass = r.get("class")  # R4: a Coding; R5: a list of CodeableConcepts
    if isinstance(klass, list):
        klass = next(iter(best_coding(k, "class") for k in klass[:1]), None)
        class_code = klass[1] if klass else None
    else:
        class_code = code_text(klass.get("code")) if isinstance(klass, dict) else None
    reasons = as_list(r.get("reasonCode"), "reasonCode")
    reason = None
    if reasons and isinstance(reasons[0], dict):
        reason = text(reasons[0].get("text")) or best_coding(reasons[0], "reasonCode")[2]
    ctx.add(
        "encounters",
        {
            "encounter_id": rid,
            "patient_id": pid,
            "start": start,
            "end": end,
            "class_code": class_code,
            "type_system": tsys,
            "type_code": tcode,
            "type_display": tdisp,
            "reason_display": reason,
        },
    )
    ctx.add_encounter(rid, pid)


# ------------------------------------------------------------------ supporting resources


@parser("Medication")
def read_medication(ctx: Context, rid: str, r: dict[str, Any]) -> None:
    ctx.medications[rid] = best_coding(r.get("code"), "code", "medication")


@parser("Binary")
def read_binary(ctx: Context, rid: str, r: dict[str, Any]) -> None:
    data = r.get("data")
    if not isinstance(data, str):
        raise Rejected("missing data")
    ctx.binaries[rid] = (optional_text(r, "contentType"), data)


# ------------------------------------------------------------------ notes

#: Note content types that are read; other attachments are counted and skipped.
NOTE_TYPES = ("text/plain", "text/html")
_TAG = re.compile(r"<[^>]+>")
_BLOCK = re.compile(r"<\s*(br|/p|/div|/li|/h[1-6]|/tr)\s*/?\s*>", re.IGNORECASE)


def html_text(markup: str) -> str:
    """The text of an HTML note: block ends become new lines, tags are dropped."""
    return html.unescape(_TAG.sub("", _BLOCK.sub("\n", markup)))


def _attachment_text(ctx: Context, attachment: dict[str, Any]) -> tuple[str | None, str | None]:
    """(content type, base64 data) of an attachment, the data inline or in a Binary."""
    ctype = optional_text(attachment, "contentType")
    data = attachment.get("data")
    url = attachment.get("url")
    if data is None and isinstance(url, str):
        target = reference_target(url)
        found = ctx.binaries.get(target or "")
        if found is None:
            raise Rejected(f"attachment.url {url[:80]!r} is not a Binary of this export")
        ctype = ctype or found[0]
        data = found[1]
    if not isinstance(data, str):
        return ctype, None
    return ctype, data


@parser("DocumentReference")
def read_note(ctx: Context, rid: str, r: dict[str, Any]) -> None:
    pid = ctx.subject(r)
    eid = ctx.encounter_of(r, pid)
    status_filter(r, frozenset({"entered-in-error"}))
    contents = as_list(r.get("content"), "content")
    if not contents:
        raise Rejected("missing content")
    other: str | None = None
    note: str | None = None
    for content in contents:
        attachment = (
            as_dict(content.get("attachment"), "attachment") if isinstance(content, dict) else None
        )
        if attachment is None:
            continue
        ctype, data = _attachment_text(ctx, attachment)
        base = (ctype or "text/plain").split(";", 1)[0].strip().lower()
        if base not in NOTE_TYPES:
            other = other or base
            continue
        if data is None:
            continue
        try:
            decoded = base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as exc:
            raise Rejected(f"note text is not base64-encoded UTF-8: {exc}") from None
        note = html_text(decoded) if base == "text/html" else decoded
        break
    if note is None:
        if other is not None:
            raise Filtered(f"note in {other} (only text/plain and text/html are read)")
        raise Rejected("missing content[0].attachment.data")
    when = r.get("date")
    if when is None:
        context = as_dict(r.get("context"), "context") or {}
        period = as_dict(context.get("period"), "context.period")
        when = period.get("start") if period else None
    ntype = best_coding(r["type"], "type")[2] if isinstance(r.get("type"), dict) else None
    ctx.add(
        "notes",
        {
            "note_id": rid,
            "patient_id": pid,
            "encounter_id": eid,
            "time": parse_time(when, "date"),
            "note_type": ntype,
            "text": note,
        },
    )


# ------------------------------------------------------------------ clinical events


@dataclass
class EventFacts:
    """What an event parser finds in one resource."""

    coding: Coding
    time: datetime
    end_time: datetime | None = None
    value: float | None = None
    value_text: str | None = None
    unit: str | None = None
    #: further rows of the same resource: (id suffix, coding, value, value_text, unit)
    parts: list[tuple[str, Coding, float | None, str | None, str | None]] = field(
        default_factory=list
    )


EventParser = Callable[[Context, dict[str, Any]], EventFacts]


def event_parser(
    rtype: str, kind: str, concept: str | None = "code"
) -> Callable[[EventParser], EventParser]:
    """Register ``fn`` (resource → `EventFacts`) as the parser of event type ``rtype``.

    ``concept``: the resource's CodeableConcept whose every coding the event's
    ``codings`` keeps (`all_codings`; the parser chose the preferred one).
    """

    def register(fn: EventParser) -> EventParser:
        def read(ctx: Context, rid: str, r: dict[str, Any]) -> None:
            pid = ctx.subject(r)
            eid = ctx.encounter_of(r, pid)
            facts = fn(ctx, r)
            base = {
                "patient_id": pid,
                "encounter_id": eid,
                "time": facts.time,
                "end_time": facts.end_time,
                "kind": kind,
            }
            rows = [("", facts.coding, facts.value, facts.value_text, facts.unit), *facts.parts]
            every = all_codings(r.get(concept)) if concept else None
            for suffix, (system, code, display), value, value_text, unit in rows:
                ctx.add(
                    "events",
                    {
                        **base,
                        "event_id": rid + suffix,
                        "code_system": system,
                        "code": code,
                        "display": display,
                        "value": value,
                        "value_text": value_text,
                        "unit": unit,
                        "codings": None if suffix else every,
                    },
                )

        RESOURCE_PARSERS[rtype] = read
        EVENT_RESOURCES[rtype] = kind
        return fn

    return register


def _time_of(r: dict[str, Any], prefix: str, *fallbacks: str) -> tuple[datetime, datetime | None]:
    """``PREFIX[DateTime|Instant|Period]``, else the first fallback field present."""
    for suffix in ("DateTime", "Instant"):
        if r.get(prefix + suffix) is not None:
            return parse_time(r[prefix + suffix], prefix + suffix), None
    period = as_dict(r.get(prefix + "Period"), prefix + "Period")
    if period is not None:
        start = parse_time(period.get("start"), f"{prefix}Period.start")
        end = parse_time(period["end"], f"{prefix}Period.end") if period.get("end") else None
        return start, end
    for name in fallbacks:
        if r.get(name) is not None:
            return parse_time(r[name], name), None
    raise Rejected(f"missing {prefix}DateTime")


@event_parser("Condition", "condition")
def condition(ctx: Context, r: dict[str, Any]) -> EventFacts:
    verification_filter(r)
    status_filter(r, frozenset({"entered-in-error"}))
    time, _ = _time_of(r, "onset", "recordedDate")
    abated = r.get("abatementDateTime")
    return EventFacts(
        best_coding(r.get("code"), "code", "condition"),
        time,
        parse_time(abated, "abatementDateTime") if abated else None,
    )


@event_parser("Procedure", "procedure")
def procedure(ctx: Context, r: dict[str, Any]) -> EventFacts:
    status_filter(r, frozenset({"entered-in-error", "not-done"}))
    time, end = _time_of(r, "performed")
    return EventFacts(best_coding(r.get("code"), "code", "procedure"), time, end)


def _medication(ctx: Context, r: dict[str, Any]) -> Coding:
    concept = r.get("medicationCodeableConcept")
    if concept is not None:
        return best_coding(concept, "medicationCodeableConcept", "medication")
    ref = as_dict(r.get("medicationReference"), "medicationReference")
    if ref is None:
        raise Rejected("missing medicationCodeableConcept")
    target = reference_target(ref.get("reference"))
    if target is None:
        raise Rejected("malformed medicationReference")
    if target.startswith("#"):
        for contained in as_list(r.get("contained"), "contained"):
            if isinstance(contained, dict) and contained.get("id") == target[1:]:
                return best_coding(contained.get("code"), "contained Medication code", "medication")
        raise Rejected(f"medicationReference {target} is not contained in the resource")
    found = ctx.medications.get(target)
    if found is None:
        if text(ref.get("display")):
            return None, None, text(ref.get("display"))
        raise Rejected(f"references absent Medication {target}")
    return found


@event_parser("MedicationRequest", "medication", "medicationCodeableConcept")
def medication_request(ctx: Context, r: dict[str, Any]) -> EventFacts:
    status_filter(r, frozenset({"entered-in-error", "cancelled"}))
    coding = _medication(ctx, r)
    return EventFacts(coding, parse_time(r.get("authoredOn"), "authoredOn"))


@event_parser("Immunization", "immunization", "vaccineCode")
def immunization(ctx: Context, r: dict[str, Any]) -> EventFacts:
    status_filter(r, frozenset({"entered-in-error", "not-done"}))
    time, _ = _time_of(r, "occurrence", "recorded")
    return EventFacts(best_coding(r.get("vaccineCode"), "vaccineCode", "immunization"), time)


def observation_value(r: dict[str, Any]) -> tuple[float | None, str | None, str | None]:
    """(number, text, unit) of an Observation's or a component's ``value[x]``."""
    q = r.get("valueQuantity")
    if (
        isinstance(q, dict)
        and isinstance(q.get("value"), int | float)
        and not isinstance(q.get("value"), bool)
    ):
        try:
            number = float(q["value"])
        except OverflowError:
            raise Rejected("valueQuantity.value is out of range") from None
        return number, None, text(q.get("unit")) or code_text(q.get("code"))
    cc = r.get("valueCodeableConcept")
    if isinstance(cc, dict):
        try:
            return None, best_coding(cc, "valueCodeableConcept")[2], None
        except Rejected:
            return None, None, None
    return None, text(r.get("valueString")), None


@event_parser("Observation", "observation")
def observation(ctx: Context, r: dict[str, Any]) -> EventFacts:
    status_filter(r, frozenset({"entered-in-error", "cancelled"}))
    time, _ = _time_of(r, "effective", "issued")
    facts = EventFacts(best_coding(r.get("code"), "code", "observation"), time)
    facts.value, facts.value_text, facts.unit = observation_value(r)
    for i, comp in enumerate(as_list(r.get("component"), "component")):
        if not isinstance(comp, dict):
            raise Rejected(f"component[{i}] is not an object")
        coding = best_coding(comp.get("code"), "component.code", "observation")
        facts.parts.append((f"#{i}", coding, *observation_value(comp)))
    return facts


@event_parser("CarePlan", "careplan", None)
def care_plan(ctx: Context, r: dict[str, Any]) -> EventFacts:
    status_filter(r, frozenset({"entered-in-error", "revoked"}))
    coded = []
    for c in as_list(r.get("category"), "category"):
        if not isinstance(c, dict):
            continue
        first = as_list(c.get("coding"), "category.coding")
        if first and isinstance(first[0], dict) and first[0].get("code") != "assess-plan":
            coded.append(c)
    if not coded:
        raise Rejected("CarePlan has no coded category")
    period = as_dict(r.get("period"), "period") or {}
    facts = EventFacts(
        best_coding(coded[0], "category", "careplan"),
        parse_time(period.get("start"), "period.start"),
        parse_time(period["end"], "period.end") if period.get("end") else None,
    )
    for i, act in enumerate(as_list(r.get("activity"), "activity")):
        detail = as_dict(act.get("detail"), "activity.detail") if isinstance(act, dict) else None
        if detail and detail.get("code"):
            coding = best_coding(detail["code"], "activity.detail.code", "careplan")
            facts.parts.append((f"#a{i}", coding, None, None, None))
    return facts


@event_parser("AllergyIntolerance", "allergy")
def allergy(ctx: Context, r: dict[str, Any]) -> EventFacts:
    verification_filter(r)
    if r.get("recordedDate") is not None:
        time = parse_time(r["recordedDate"], "recordedDate")
    else:
        time, _ = _time_of(r, "onset")
    return EventFacts(best_coding(r.get("code"), "code", "allergy"), time)


KIND_RESOURCE = {kind: rtype for rtype, kind in EVENT_RESOURCES.items()}
READ_TYPES = frozenset(RESOURCE_PARSERS)
