"""The canonical tables: one pyarrow schema each, the single source of truth.

Every source (FHIR R4, OMOP CDM) writes these tables and every later step reads
them. Times are UTC timestamps with microsecond precision. Identifiers are
strings. `docs/data-model.md` documents each column for users.

Tables
------
patients          one row per patient (pseudonymous ``patient_id``)
encounters        one row per encounter
events            one row per clinical fact (condition, procedure, medication, ...)
notes             one row per clinical note (plain text)
reference_plans   one row per encounter that has a written plan
plan_items        one row per item of a reference plan (long form)
index_encounters  one row per scorable encounter: its next encounter has a plan
quarantine        one row per input record that was rejected, with the reason
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa

SCHEMA_VERSION: Final = "1"

TS = pa.timestamp("us", tz="UTC")

#: The kinds of clinical event; ``events.kind`` takes one of these values.
EVENT_KINDS: Final = (
    "condition",
    "procedure",
    "medication",
    "immunization",
    "observation",
    "careplan",
    "allergy",
)

#: The kinds of plan item (what the physician ordered at an encounter).
PLAN_ITEM_KINDS: Final = ("procedure", "lab", "medication", "immunization", "careplan")

PATIENTS = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("birth_date", pa.date32()),
        pa.field("sex", pa.string()),
        pa.field("deceased_time", TS),
        pa.field("race", pa.string()),
        pa.field("ethnicity", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_file", pa.string()),
    ]
)

ENCOUNTERS = pa.schema(
    [
        pa.field("encounter_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("start", TS, nullable=False),
        pa.field("end", TS, nullable=False),
        pa.field("class_code", pa.string()),
        pa.field("type_system", pa.string()),
        pa.field("type_code", pa.string()),
        pa.field("type_display", pa.string()),
        pa.field("reason_display", pa.string()),
    ]
)

EVENTS = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("encounter_id", pa.string()),
        # when the fact happened (onset, performed, authored, effective)
        pa.field("time", TS, nullable=False),
        # when it entered the record: the later of `time` and its encounter's
        # start (a pregnancy diagnosed at a visit has an earlier onset). Every
        # "as of t" filter uses this column, so later diagnoses never leak.
        pa.field("recorded_time", TS, nullable=False),
        pa.field("end_time", TS),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("code_system", pa.string()),
        pa.field("code", pa.string()),
        pa.field("display", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("value_text", pa.string()),
        pa.field("unit", pa.string()),
        # every coding of the concept when it has several (JSON list of "SYSTEM|CODE", in
        # the source's order); code_system/code hold the preferred one. Null: one coding.
        pa.field("codings", pa.string()),
    ]
)

NOTES = pa.schema(
    [
        pa.field("note_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("encounter_id", pa.string()),
        pa.field("time", TS, nullable=False),
        pa.field("note_type", pa.string()),
        pa.field("text", pa.string(), nullable=False),
    ]
)

REFERENCE_PLANS = pa.schema(
    [
        pa.field("encounter_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("time", TS, nullable=False),
        # "note": parsed from the note's "Assessment and Plan";
        # "events": no note, built from the orders recorded at the encounter
        pa.field("plan_source", pa.string(), nullable=False),
        pa.field("plan_text", pa.string(), nullable=False),
        pa.field("n_items", pa.int32(), nullable=False),
    ]
)

PLAN_ITEMS = pa.schema(
    [
        pa.field("encounter_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        # the recommender's item identifier: "SYSTEM|CODE" when the item was
        # resolved to a coded event, else "text|normalized display"
        pa.field("item_key", pa.string(), nullable=False),
        pa.field("code_system", pa.string()),
        pa.field("code", pa.string()),
        pa.field("display", pa.string(), nullable=False),
    ]
)

INDEX_ENCOUNTERS = pa.schema(
    [
        pa.field("encounter_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        # the prompt may use only what is recorded at or before index_time
        pa.field("index_time", TS, nullable=False),
        pa.field("next_encounter_id", pa.string(), nullable=False),
        pa.field("next_time", TS, nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("is_obstetric", pa.bool_(), nullable=False),
        pa.field("is_adult", pa.bool_(), nullable=False),
        pa.field("age_years", pa.float64()),
        pa.field("n_plan_items", pa.int32(), nullable=False),
    ]
)

QUARANTINE = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("resource_type", pa.string()),
        pa.field("resource_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

#: Table name → schema, in the order they are written.
TABLES: Final[dict[str, pa.Schema]] = {
    "patients": PATIENTS,
    "encounters": ENCOUNTERS,
    "events": EVENTS,
    "notes": NOTES,
    "reference_plans": REFERENCE_PLANS,
    "plan_items": PLAN_ITEMS,
    "index_encounters": INDEX_ENCOUNTERS,
    "quarantine": QUARANTINE,
}

SPLITS: Final = ("train", "validation", "test")
#: The canonical tables whose rows belong to one patient (the quarantine table does not).
PATIENT_TABLES: Final = (
    "patients",
    "encounters",
    "events",
    "notes",
    "reference_plans",
    "plan_items",
    "index_encounters",
)

#: The canonical row order of each table (ascending, missing values first). The
#: keys of the patient tables are unique, so the order is total and reruns, one
#: reader or many, in memory or staged, write identical files.
ROW_ORDER: Final[dict[str, list[str]]] = {
    "patients": ["patient_id"],
    "encounters": ["patient_id", "start", "encounter_id"],
    "events": ["patient_id", "time", "event_id"],
    "notes": ["patient_id", "time", "note_id"],
    "reference_plans": ["patient_id", "time", "encounter_id"],
    "plan_items": ["patient_id", "encounter_id", "position"],
    "index_encounters": ["patient_id", "index_time", "encounter_id"],
    "quarantine": ["source_file", "resource_type", "resource_id", "reason"],
}
