"""One reader per OMOP CDM table, behind a registry (`TABLE_READERS`).

Each reader reads only the columns it needs from its table (`access`), checks
every row and quarantines the ones it cannot use with the reason: a missing or
unparsable id, date or number, a person absent from ``person``, a duplicate
id. It adds what it kept to the `Cdm` being read. A new table: a function
decorated with ``@reader("table")`` (readers run in registry order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipelines.omop.access import TableAccess
from pipelines.sources import SOURCE_ID_COLUMN, IngestError, IngestSummary, pseudonym

SOURCE = "omop"


class OmopSchemaError(IngestError):
    """An OMOP table lacks columns the reader needs."""


@dataclass(frozen=True)
class EventTable:
    """How one CDM event table maps to ``events``."""

    kind: str
    prefix: str
    id: str
    concept: str
    date: str
    datetime: str
    end: str | None = None


EVENT_TABLES: dict[str, EventTable] = {
    "condition_occurrence": EventTable(
        "condition", "co", "condition_occurrence_id", "condition_concept_id",
        "condition_start_date", "condition_start_datetime", "condition_end_date",
    ),
    "procedure_occurrence": EventTable(
        "procedure", "po", "procedure_occurrence_id", "procedure_concept_id",
        "procedure_date", "procedure_datetime",
    ),
    "drug_exposure": EventTable(
        "medication", "de", "drug_exposure_id", "drug_concept_id",
        "drug_exposure_start_date", "drug_exposure_start_datetime", "drug_exposure_end_date",
    ),
    "measurement": EventTable(
        "observation", "me", "measurement_id", "measurement_concept_id",
        "measurement_date", "measurement_datetime",
    ),
    "observation": EventTable(
        "observation", "ob", "observation_id", "observation_concept_id",
        "observation_date", "observation_datetime",
    ),
}  # fmt: skip
VALUE_COLUMNS = ("value_as_number", "value_as_string", "unit_concept_id", "unit_source_value")


@dataclass
class Cdm:
    """What the table readers have read so far."""

    access: TableAccess
    salt: str | None
    summary: IngestSummary = field(default_factory=lambda: IngestSummary(source=SOURCE))
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    #: person_id → pseudonym
    persons: dict[int, str] = field(default_factory=dict)
    patients: pd.DataFrame | None = None
    deaths: dict[str, pd.Timestamp] = field(default_factory=dict)
    visits: pd.DataFrame | None = None
    events: list[pd.DataFrame] = field(default_factory=list)
    notes: pd.DataFrame | None = None

    def table(
        self, table: str, needed: Sequence[str], optional: Sequence[str] = ()
    ) -> pd.DataFrame | None:
        """The ``needed`` and present ``optional`` columns of ``table`` (None: absent or empty).

        Raises OmopSchemaError naming the table, where it came from and the missing columns.
        """
        if table not in self.access.origins:
            return None
        cols = self.access.columns(table)
        if not cols or all(c.startswith("column") for c in cols):
            self.summary.notes.append(f"table {table} is empty (no CDM columns)")
            return None
        missing = [c for c in needed if c not in cols]
        if missing:
            raise OmopSchemaError(
                f"OMOP table {table} ({self.access.origins[table]}) is missing columns "
                f"{missing}: it must follow the CDM 5.3 table definition"
            )
        wanted = [*needed, *(c for c in optional if c in cols)]
        frames = list(self.access.read(table, wanted))
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=wanted)
        self.summary.read += len(df)
        return df

    def reject(
        self, table: str, df: pd.DataFrame, bad: pd.Series, id_col: str, reason: str
    ) -> None:
        """Quarantine the rows ``bad`` of ``df`` (from ``table``) with ``reason``."""
        origin = self.access.origins[table]
        for rid in df.loc[bad, id_col]:
            shown = None if rid is None or (isinstance(rid, float) and pd.isna(rid)) else str(rid)
            self.quarantine.append(
                {
                    "source": SOURCE,
                    "source_file": origin,
                    "resource_type": table,
                    "resource_id": shown,
                    "reason": reason,
                }
            )
        self.summary.quarantined += int(bad.sum())

    def keep(self, table: str, n: int) -> None:
        self.summary.kept += n
        self.summary.kept_by_type[table] += n


TableReader = Callable[[Cdm], None]
#: CDM table → its reader, in reading order (person first: the others refer to it).
TABLE_READERS: dict[str, TableReader] = {}


def reader(table: str) -> Callable[[TableReader], TableReader]:
    def register(fn: TableReader) -> TableReader:
        TABLE_READERS[table] = fn
        return fn

    return register


def integers(values: pd.Series) -> pd.Series:
    """Whole numbers (ids, concept ids) or <NA> where missing or unparsable."""
    number = pd.to_numeric(values, errors="coerce")
    whole = number.notna() & (number == number.round())
    return number.where(whole).astype("Int64")


def times(df: pd.DataFrame, datetime_col: str | None, date_col: str) -> pd.Series:
    """The date-time column where set and parsable, else the date column (UTC)."""
    date = pd.to_datetime(df[date_col], errors="coerce", utc=True)
    if datetime_col and datetime_col in df.columns:
        return pd.to_datetime(df[datetime_col], errors="coerce", utc=True).fillna(date)
    return date


def _unparsable(df: pd.DataFrame, column: str, parsed: pd.Series) -> pd.Series:
    """Rows where ``column`` has a value that did not parse."""
    raw = df[column]
    present = raw.notna() & (raw.astype(str).str.strip() != "")
    return present & parsed.isna()


@reader("person")
def read_person(cdm: Cdm) -> None:
    df = cdm.table(
        "person",
        ("person_id", "gender_concept_id", "year_of_birth"),
        (
            "month_of_birth",
            "day_of_birth",
            "birth_datetime",
            "race_source_value",
            "ethnicity_source_value",
        ),
    )
    if df is None:
        raise OmopSchemaError(
            f"{cdm.access.origins or 'the input'} has no person table: an OMOP CDM needs one"
        )
    pid = integers(df["person_id"])
    missing = pid.isna()
    dup = pid.duplicated(keep="first") & ~missing
    cdm.reject("person", df, missing, "person_id", "missing or unparsable person_id")
    cdm.reject("person", df, dup, "person_id", "duplicate person_id")
    ok = ~(missing | dup)
    df, pid = df[ok], pid[ok]
    cdm.keep("person", len(df))
    ones = pd.Series(1, index=df.index)
    fallback = pd.to_datetime(
        {
            "year": integers(df["year_of_birth"]),
            "month": integers(df.get("month_of_birth", ones)).fillna(1),
            "day": integers(df.get("day_of_birth", ones)).fillna(1),
        },
        errors="coerce",
    )
    birth = (
        pd.to_datetime(df["birth_datetime"], errors="coerce").fillna(fallback)
        if "birth_datetime" in df.columns
        else fallback
    )
    cdm.persons = {int(p): pseudonym(SOURCE, str(int(p)), cdm.salt) for p in pid}
    gender = integers(df["gender_concept_id"]).map({8532: "female", 8507: "male"})
    cdm.patients = pd.DataFrame(
        {
            "patient_id": pid.map(cdm.persons).astype(object),
            "birth_date": birth.dt.date,
            "sex": gender.astype(object).fillna("unknown"),
            "race": df.get("race_source_value"),
            "ethnicity": df.get("ethnicity_source_value"),
            "source": SOURCE,
            "source_file": cdm.access.origins["person"],
            SOURCE_ID_COLUMN: pid.astype(str),
        }
    )


def _persons(cdm: Cdm, table: str, df: pd.DataFrame, id_col: str) -> pd.Series:
    """Quarantine rows of an absent or unparsable person; returns the kept rows' mask."""
    pid = integers(df["person_id"])
    absent = ~pid.isin(list(cdm.persons))
    cdm.reject(table, df, absent, id_col, "references absent person")
    return ~absent


@reader("death")
def read_death(cdm: Cdm) -> None:
    df = cdm.table("death", ("person_id", "death_date"), ("death_datetime",))
    if df is None:
        return
    ok = _persons(cdm, "death", df, "person_id")
    when = times(df, "death_datetime", "death_date")
    no_date = ok & when.isna()
    cdm.reject("death", df, no_date, "person_id", "missing or unparsable death_date")
    ok &= ~no_date
    cdm.keep("death", int(ok.sum()))
    for p, t in zip(integers(df.loc[ok, "person_id"]), when[ok], strict=True):
        cdm.deaths.setdefault(cdm.persons[int(p)], t)


VISIT_CLASS = {9201: "IMP", 9202: "AMB", 9203: "EMER"}


@reader("visit_occurrence")
def read_visits(cdm: Cdm) -> None:
    df = cdm.table(
        "visit_occurrence",
        ("visit_occurrence_id", "person_id", "visit_concept_id", "visit_start_date"),
        ("visit_end_date", "visit_start_datetime", "visit_end_datetime"),
    )
    if df is None:
        return
    vid = integers(df["visit_occurrence_id"])
    table = "visit_occurrence"
    no_id = vid.isna()
    cdm.reject(table, df, no_id, "visit_occurrence_id", "missing or unparsable visit_occurrence_id")
    absent = ~no_id & ~integers(df["person_id"]).isin(list(cdm.persons))
    cdm.reject(table, df, absent, "visit_occurrence_id", "references absent person")
    ok = ~(no_id | absent)
    start = times(df, "visit_start_datetime", "visit_start_date")
    end = (
        times(df, "visit_end_datetime", "visit_end_date")
        if "visit_end_date" in df.columns
        else start
    )
    no_start = ok & start.isna()
    cdm.reject(table, df, no_start, "visit_occurrence_id", "missing or unparsable visit_start_date")
    ok &= ~no_start
    dup = ok & vid.where(ok).duplicated(keep="first") & vid.notna()
    cdm.reject(table, df, dup, "visit_occurrence_id", "duplicate visit_occurrence_id")
    ok &= ~dup
    cdm.keep(table, int(ok.sum()))
    df, vid, start, end = df[ok], vid[ok], start[ok], end[ok].fillna(start[ok])
    concept = integers(df["visit_concept_id"])
    cdm.visits = pd.DataFrame(
        {
            "visit_id": vid,
            "encounter_id": "v" + vid.astype(str),
            "patient_id": integers(df["person_id"]).map(cdm.persons).astype(object),
            "start": start,
            "end": end.where(end >= start, start),
            "class_code": concept.map(VISIT_CLASS).astype(object),
            "type_system": "OMOP",
            "type_code": concept.astype(str),
            "concept": concept,
            "reason_display": None,
        }
    )


def _event_reader(table: str, spec: EventTable) -> TableReader:
    def read(cdm: Cdm) -> None:
        optional = [spec.datetime, "visit_occurrence_id", *VALUE_COLUMNS]
        if spec.end:
            optional.append(spec.end)
        df = cdm.table(table, ("person_id", spec.id, spec.concept, spec.date), optional)
        if df is None:
            return
        rid = integers(df[spec.id])
        no_id = rid.isna()
        cdm.reject(table, df, no_id, spec.id, f"missing or unparsable {spec.id}")
        ok = ~no_id
        pid = integers(df["person_id"])
        absent = ok & ~pid.isin(list(cdm.persons))
        cdm.reject(table, df, absent, spec.id, "references absent person")
        ok &= ~absent
        time = times(df, spec.datetime, spec.date)
        no_time = ok & time.isna()
        cdm.reject(table, df, no_time, spec.id, f"missing or unparsable {spec.date}")
        ok &= ~no_time
        concept = integers(df[spec.concept])
        bad_concept = ok & concept.isna()
        cdm.reject(table, df, bad_concept, spec.id, f"missing or unparsable {spec.concept}")
        ok &= ~bad_concept
        value = (
            pd.to_numeric(df["value_as_number"], errors="coerce")
            if "value_as_number" in df.columns
            else pd.Series(float("nan"), index=df.index)
        )
        if "value_as_number" in df.columns:
            bad_value = ok & _unparsable(df, "value_as_number", value)
            cdm.reject(table, df, bad_value, spec.id, "unparsable value_as_number")
            ok &= ~bad_value
        cdm.keep(table, int(ok.sum()))
        none = pd.Series(None, index=df.index, dtype=object)
        end = (
            pd.to_datetime(df[spec.end], errors="coerce", utc=True)
            if spec.end and spec.end in df.columns
            else pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns, UTC]")
        )
        events = pd.DataFrame(
            {
                "event_id": spec.prefix + rid.astype(str),
                "patient_id": pid.map(cdm.persons).astype(object),
                "visit_id": integers(df["visit_occurrence_id"])
                if "visit_occurrence_id" in df.columns
                else pd.Series(pd.NA, index=df.index, dtype="Int64"),
                "time": time,
                "end_time": end,
                "kind": spec.kind,
                "concept": concept,
                "value": value.astype(float),
                "value_text": df.get("value_as_string", none).astype(object),
                "unit_concept": integers(df["unit_concept_id"])
                if "unit_concept_id" in df.columns
                else pd.Series(pd.NA, index=df.index, dtype="Int64"),
                "unit_source": df.get("unit_source_value", none).astype(object),
            }
        )
        cdm.events.append(events[ok])

    return read


for _table, _spec in EVENT_TABLES.items():
    TABLE_READERS[_table] = _event_reader(_table, _spec)


@reader("note")
def read_notes(cdm: Cdm) -> None:
    df = cdm.table(
        "note",
        ("note_id", "person_id", "note_text", "note_date"),
        ("note_datetime", "visit_occurrence_id", "note_title"),
    )
    if df is None:
        cdm.summary.notes.append("no clinical notes in this database")
        return
    nid = integers(df["note_id"])
    no_id = nid.isna()
    cdm.reject("note", df, no_id, "note_id", "missing or unparsable note_id")
    ok = ~no_id
    pid = integers(df["person_id"])
    absent = ok & ~pid.isin(list(cdm.persons))
    cdm.reject("note", df, absent, "note_id", "references absent person")
    ok &= ~absent
    time = times(df, "note_datetime", "note_date")
    no_time = ok & time.isna()
    cdm.reject("note", df, no_time, "note_id", "missing or unparsable note_date")
    ok &= ~no_time
    cdm.keep("note", int(ok.sum()))
    visit = (
        integers(df["visit_occurrence_id"])
        if "visit_occurrence_id" in df.columns
        else pd.Series(pd.NA, index=df.index, dtype="Int64")
    )
    cdm.notes = pd.DataFrame(
        {
            "note_id": "n" + nid.astype(str),
            "patient_id": pid.map(cdm.persons).astype(object),
            "encounter_id": ("v" + visit.astype(str)).where(visit.notna()).astype(object),
            "time": time,
            "note_type": df.get("note_title"),
            "text": df["note_text"].fillna("").astype(str),
        }
    )[ok]
