"""Index encounters, the per-patient split, and a patient's context as of an index time.

An encounter is an *index encounter* when the patient's next encounter (the
first one that starts strictly after it ends) has a reference plan with at
least one item. Its ``index_time`` is its end: the prompt may use only what is
recorded at or before it. The reference is the next encounter's plan.

Patients, not encounters, are split: a salted hash of the patient id decides,
so a patient's split never changes when other patients are added.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

import numpy as np
import pandas as pd

from pipelines.clinical import active_pregnancies
from pipelines.schemas import INDEX_ENCOUNTERS, SPLITS

DEFAULT_SPLIT_SEED: Final = 0
DEFAULT_FRACTIONS: Final = (0.7, 0.15, 0.15)

#: Words that mark obstetric care in encounter types, reasons and event displays. Labour
#: is a whole word and not the labour force: "Laboratory test" and the social-history
#: finding "Not in labor force" (recorded at general check-ups, men's too) are not
#: obstetric.
OBSTETRIC_PATTERN: Final = re.compile(
    r"pregnan|prenatal|antenatal|antepartum|obstetric|fetal|fetus|gestation|"
    r"\blabou?r\b(?!\s+force)|delivery|postpartum|postnatal|miscarriage|eclampsia|trimester|"
    r"cesarean|caesarean|placent|amnio|episiotomy|childbirth|tubal pregnancy",
    re.IGNORECASE,
)
ADULT_AGE: Final = 18.0


def split_of(
    patient_id: str,
    seed: int = DEFAULT_SPLIT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> str:
    """train / validation / test for a patient, from a seeded hash of her id."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return SPLITS[0]
    if u < fractions[0] + fractions[1]:
        return SPLITS[1]
    return SPLITS[2]


def index_encounters(
    encounters: pd.DataFrame,
    events: pd.DataFrame,
    patients: pd.DataFrame,
    reference_plans: pd.DataFrame,
    split_seed: int = DEFAULT_SPLIT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> pd.DataFrame:
    """The index encounters of a cohort, with split, obstetric and adult flags.

    Returns a frame with the columns of ``schemas.INDEX_ENCOUNTERS``, sorted by
    patient and time.
    """
    enc = encounters[
        ["encounter_id", "patient_id", "start", "end", "type_display", "reason_display"]
    ]
    enc = enc.sort_values(["patient_id", "start", "end", "encounter_id"]).reset_index(drop=True)
    # The next encounter: the first whose start is strictly after this one's end.
    nxt = pd.merge_asof(
        enc[["encounter_id", "patient_id", "end"]].sort_values("end"),
        enc[["encounter_id", "patient_id", "start"]]
        .rename(columns={"encounter_id": "next_encounter_id", "start": "next_time"})
        # ties broken by id: which of two same-time encounters is "next" must not
        # depend on other patients' rows (an unstable sort made it so)
        .sort_values(["next_time", "next_encounter_id"], kind="stable"),
        left_on="end",
        right_on="next_time",
        by="patient_id",
        direction="forward",
        allow_exact_matches=False,
    )
    plans = reference_plans[reference_plans["n_items"] > 0][["encounter_id", "n_items"]]
    idx = nxt.dropna(subset=["next_encounter_id"]).merge(
        plans.rename(columns={"encounter_id": "next_encounter_id", "n_items": "n_plan_items"}),
        on="next_encounter_id",
        how="inner",
    )
    idx = idx.rename(columns={"end": "index_time"})

    births = patients.set_index("patient_id")["birth_date"]
    birth = pd.to_datetime(idx["patient_id"].map(births), utc=True)
    idx["age_years"] = ((idx["index_time"] - birth).dt.days / 365.25).astype("float64")
    idx["is_adult"] = (idx["age_years"] >= ADULT_AGE).fillna(False).astype(bool)
    idx["is_obstetric"] = _obstetric_flags(idx, enc, events)
    idx["split"] = [split_of(p, split_seed, fractions) for p in idx["patient_id"]]
    idx["n_plan_items"] = idx["n_plan_items"].astype("int32")
    out = idx[INDEX_ENCOUNTERS.names].sort_values(["patient_id", "index_time", "encounter_id"])
    return out.reset_index(drop=True)


def _obstetric_flags(idx: pd.DataFrame, enc: pd.DataFrame, events: pd.DataFrame) -> np.ndarray:
    """Pregnant at the index time (`pipelines.clinical`), or obstetric codes on the index encounter."""
    flags = np.zeros(len(idx), dtype=bool)
    if idx.empty:
        return flags
    queries = pd.DataFrame({"patient_id": idx["patient_id"], "at": idx["index_time"]})
    flags |= active_pregnancies(events, queries)["pregnant"].to_numpy(dtype=bool)
    text = enc["type_display"].fillna("") + " " + enc["reason_display"].fillna("")
    ob_enc = set(enc.loc[text.str.contains(OBSTETRIC_PATTERN), "encounter_id"])
    ev = events.loc[
        events["encounter_id"].notna() & events["display"].notna(), ["encounter_id", "display"]
    ]
    ob_enc |= set(ev.loc[ev["display"].str.contains(OBSTETRIC_PATTERN), "encounter_id"])
    flags |= idx["encounter_id"].isin(ob_enc).to_numpy()
    return flags


@dataclass(frozen=True)
class PatientContext:
    """Everything recorded about one patient at or before an index time."""

    patient: pd.Series
    index: pd.Series
    encounters: pd.DataFrame
    events: pd.DataFrame
    notes: pd.DataFrame
    reference_plans: pd.DataFrame
    plan_items: pd.DataFrame

    @property
    def index_time(self) -> pd.Timestamp:
        return pd.Timestamp(self.index["index_time"])


def _as_of(
    patient: pd.Series, index: pd.Series, own: dict[str, pd.DataFrame], plan_items: pd.DataFrame
) -> PatientContext:
    """Cut one patient's frames (``own``: encounters, events, notes, reference_plans) at the index time."""
    t = index["index_time"]
    encounters = own["encounters"]
    encounters = encounters[encounters["start"] <= t].reset_index(drop=True)
    # Ends that lie after the index time are not known yet at the index time.
    encounters["end"] = encounters["end"].where(encounters["end"] <= t, t)
    events = own["events"]
    events = events[events["recorded_time"] <= t].reset_index(drop=True)
    events["end_time"] = events["end_time"].where(events["end_time"] <= t)
    notes = own["notes"]
    notes = notes[notes["time"] <= t].reset_index(drop=True)
    plans = own["reference_plans"]
    plans = plans[plans["time"] <= t].reset_index(drop=True)
    items = plan_items[plan_items["encounter_id"].isin(set(plans["encounter_id"]))].reset_index(
        drop=True
    )
    return PatientContext(patient, index, encounters, events, notes, plans, items)


CONTEXT_TABLES = ("encounters", "events", "notes", "reference_plans")


def context_as_of(tables: dict[str, pd.DataFrame], encounter_id: str) -> PatientContext:
    """A patient's record as of an index encounter: nothing recorded after its index time.

    ``tables`` maps canonical table names to frames (as read from a workspace).
    Encounters are kept when they started at or before the index time (an end
    after it is cut to it); events when they were recorded at or before it
    (``recorded_time``: a diagnosis made at the next visit has an earlier onset
    but is not known yet); notes and plans when their time is at or before it;
    plan items when their plan is kept. Raises KeyError naming the encounter
    when it is not an index encounter. For many encounters use `ContextStore`.
    """
    return ContextStore(tables, only_encounters=[encounter_id]).context(encounter_id)


class ContextStore:
    """Contexts of many index encounters: the tables are grouped by patient once."""

    def __init__(
        self, tables: dict[str, pd.DataFrame], only_encounters: list[str] | None = None
    ) -> None:
        idx = tables["index_encounters"]
        if only_encounters is not None:
            idx = idx[idx["encounter_id"].isin(only_encounters)]
        self.index = idx.set_index("encounter_id", drop=False)
        wanted = set(self.index["patient_id"])
        self.patients = tables["patients"].set_index("patient_id", drop=False)
        self._by_patient: dict[str, dict[str, pd.DataFrame]] = {p: {} for p in wanted}
        for name in CONTEXT_TABLES:
            frame = tables[name]
            frame = frame[frame["patient_id"].isin(wanted)]
            empty = frame.iloc[0:0]
            groups = dict(tuple(frame.groupby("patient_id", sort=False)))
            for pid in wanted:
                self._by_patient[pid][name] = groups.get(pid, empty)
        items = tables["plan_items"]
        self._items = dict(
            tuple(items[items["patient_id"].isin(wanted)].groupby("patient_id", sort=False))
        )
        self._no_items = items.iloc[0:0]

    def context(self, encounter_id: str) -> PatientContext:
        if encounter_id not in self.index.index:
            raise KeyError(
                f"{encounter_id!r} is not an index encounter (see table index_encounters)"
            )
        index = self.index.loc[encounter_id]
        pid = index["patient_id"]
        return _as_of(
            self.patients.loc[pid],
            index,
            self._by_patient[pid],
            self._items.get(pid, self._no_items),
        )
