"""The cohort tables as per-patient coded timelines, and sums over them as of each state.

:func:`prepare` turns the canonical tables into integer-coded frames (patient
code, microsecond times); :func:`time_weighted_sum` adds up what happened to a
patient at or before each state's time, optionally in a window or decayed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from pipelines.clinical import active_pregnancies
from recsys.states import NEVER, STATE_KEY_COLUMNS, CohortTables, micros
from recsys.type_aliases import SparseMatrix


@dataclass(frozen=True)
class Prepared:
    keys: pd.DataFrame
    pid: npt.NDArray[np.int64]  # patient code per state
    patient_codes: dict[str, int]
    plans: pd.DataFrame  # pid, t, plan_encounter_id, item_key, kind, display
    # pid, t (recorded), onset, end, kind, key, display, code_system, code
    events: pd.DataFrame
    encounters: pd.DataFrame  # pid, encounter_id, t, class_code, type_key, type_display
    # per state, the pregnancy active at index_time (`pipelines.clinical.active_pregnancies`)
    pregnancy: pd.DataFrame


def _state_keys(index_encounters: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    keys = index_encounters.sort_values(
        ["patient_id", "index_time", "encounter_id"], kind="stable"
    ).reset_index(drop=True)
    keys = keys.copy()
    keys["index_us"] = micros(keys["index_time"])
    keys["next_us"] = micros(keys["next_time"])
    age = pd.to_numeric(keys.get("age_years"), errors="coerce")
    if age.isna().any() and "birth_date" in patients:
        birth = patients.set_index("patient_id")["birth_date"]
        born = pd.to_datetime(keys["patient_id"].map(birth), utc=True)
        derived = (pd.to_datetime(keys["index_time"], utc=True) - born).dt.days / 365.25
        age = age.fillna(derived)
    keys["age_years"] = age.astype("float64")
    keys["is_obstetric"] = keys["is_obstetric"].astype(bool)
    keys["is_adult"] = keys["is_adult"].astype(bool)
    return keys[list(STATE_KEY_COLUMNS)]


def _event_key(frame: pd.DataFrame) -> pd.Series:
    coded = frame["code"].notna() & (frame["code"].astype("str") != "")
    system = frame["code_system"].fillna("").astype("str")
    display = frame["display"].fillna("").astype("str").str.strip().str.lower()
    return (system + "|" + frame["code"].fillna("").astype("str")).where(coded, "text|" + display)


def prepare(tables: CohortTables) -> Prepared:
    keys = _state_keys(tables.index_encounters, tables.patients)
    codes = {p: i for i, p in enumerate(pd.unique(keys["patient_id"]))}
    pid = keys["patient_id"].map(codes).to_numpy(dtype=np.int64)

    enc = tables.encounters
    enc = enc[enc["patient_id"].isin(codes.keys())]
    type_key = enc["type_system"].fillna("").astype("str") + "|" + enc["type_code"].fillna("")
    type_key = type_key.where(enc["type_code"].notna(), "text|" + enc["type_display"].fillna(""))
    encounters = pd.DataFrame(
        {
            "pid": enc["patient_id"].map(codes).to_numpy(dtype=np.int64),
            "encounter_id": enc["encounter_id"].to_numpy(),
            "t": micros(enc["start"]),
            "end": micros(enc["end"]),
            "class_code": enc["class_code"].fillna("unknown").to_numpy(),
            "type_key": type_key.to_numpy(),
            "type_display": enc["type_display"].fillna("").to_numpy(),
        }
    )

    items = tables.plan_items
    items = items[items["patient_id"].isin(codes.keys())]
    # a plan is on record once its encounter has ended (the index encounter's own plan
    # ends exactly at index_time; a stay that spans index_time is not yet written up)
    written = encounters.drop_duplicates("encounter_id").set_index("encounter_id")["end"]
    plan_t = items["encounter_id"].map(written)
    plans = pd.DataFrame(
        {
            "pid": items["patient_id"].map(codes).to_numpy(dtype=np.int64),
            "t": plan_t.to_numpy(),
            "plan_encounter_id": items["encounter_id"].to_numpy(),
            "item_key": items["item_key"].to_numpy(),
            "kind": items["kind"].to_numpy(),
            "display": items["display"].to_numpy(),
            "code_system": items["code_system"].to_numpy(),
            "code": items["code"].to_numpy(),
        }
    )
    # a plan whose encounter is unknown has no time: it cannot be placed before any state
    plans = plans[plans["t"].notna()].astype({"t": np.int64})

    ev = tables.events
    ev = ev[ev["patient_id"].isin(codes.keys()) & ev["time"].notna()]
    onset = micros(ev["time"])
    # availability: when the fact entered the record (older tables lack the column)
    recorded = micros(ev["recorded_time"]) if "recorded_time" in ev else onset.copy()
    recorded = np.where(recorded == NEVER, onset, np.maximum(recorded, onset))
    events = pd.DataFrame(
        {
            "pid": ev["patient_id"].map(codes).to_numpy(dtype=np.int64),
            "t": recorded,
            "onset": onset,
            "end": micros(ev["end_time"]),
            "kind": ev["kind"].to_numpy(),
            "key": _event_key(ev).to_numpy(),
            "display": ev["display"].fillna("").to_numpy(),
            "code_system": ev["code_system"].to_numpy(),
            "code": ev["code"].to_numpy(),
        }
    )
    at_index = pd.DataFrame({"patient_id": keys["patient_id"], "at": keys["index_time"]})
    pregnancy = active_pregnancies(tables.events, at_index)
    return Prepared(keys, pid, codes, plans, events, encounters, pregnancy)


def _patient_chunks(
    left_pid: npt.NDArray[np.int64], right_pid: npt.NDArray[np.int64], max_pairs: int
) -> Iterator[npt.NDArray[np.int64]]:
    """Groups of patient codes whose left × right row pairs stay under ``max_pairs``."""
    lc = pd.Series(left_pid).value_counts()
    rc = pd.Series(right_pid).value_counts()
    cost = (lc * rc.reindex(lc.index).fillna(0)).sort_index()
    cost = cost[cost > 0]
    if cost.empty:
        return
    chunk = (cost.cumsum() // max(1, max_pairs)).to_numpy()
    patients = cost.index.to_numpy(dtype=np.int64)
    for c in np.unique(chunk):
        yield patients[chunk == c]


def time_weighted_sum(
    state_pid: npt.NDArray[np.int64],
    state_t: npt.NDArray[np.int64],
    occ_pid: npt.NDArray[np.int64],
    occ_t: npt.NDArray[np.int64],
    occ_col: npt.NDArray[np.int64],
    occ_value: npt.NDArray[np.floating[Any]],
    n_cols: int,
    *,
    window_us: float | None = None,
    half_life_us: float | None = None,
    max_pairs: int,
) -> SparseMatrix:
    """Σ over occurrences of the same patient at or before each state's time.

    Occurrences are first summed per (patient, time) into a sparse group × column
    matrix; a sparse state × group matrix of time weights (1, or the decay
    ``0.5 ** (Δt / half_life)``; 0 outside ``window``) is multiplied into it, so
    the work grows with patient × distinct-time pairs, not with events.

    Returns: (n_states, n_cols) float32 CSR.
    """
    n_states = len(state_pid)
    if len(occ_pid) == 0 or n_states == 0:
        return sp.csr_matrix((n_states, n_cols), dtype=np.float32)
    occ = pd.DataFrame({"pid": occ_pid, "t": occ_t})
    gid = occ.groupby(["pid", "t"], sort=False).ngroup().to_numpy(dtype=np.int64)
    n_groups = int(gid.max()) + 1
    grouped = sp.csr_matrix(
        (np.asarray(occ_value, dtype=np.float64), (gid, occ_col)), shape=(n_groups, n_cols)
    )
    groups = occ.assign(gid=gid).drop_duplicates("gid")
    states = pd.DataFrame({"pid": state_pid, "ts": state_t, "state": np.arange(n_states)})
    parts_s: list[npt.NDArray[np.int64]] = []
    parts_g: list[npt.NDArray[np.int64]] = []
    parts_w: list[npt.NDArray[np.float64]] = []
    for patients in _patient_chunks(state_pid, groups["pid"].to_numpy(), max_pairs):
        left = states[states["pid"].isin(patients)]
        right = groups[groups["pid"].isin(patients)]
        pairs = left.merge(right, on="pid")
        dt = pairs["ts"].to_numpy() - pairs["t"].to_numpy()
        keep = dt >= 0
        if window_us is not None:
            keep &= dt <= window_us
        dt = dt[keep]
        parts_s.append(pairs["state"].to_numpy()[keep])
        parts_g.append(pairs["gid"].to_numpy()[keep])
        if half_life_us is None:
            parts_w.append(np.ones(len(dt)))
        else:
            parts_w.append(np.power(0.5, dt / half_life_us))
    if not parts_s:
        return sp.csr_matrix((n_states, n_cols), dtype=np.float32)
    weights = sp.csr_matrix(
        (np.concatenate(parts_w), (np.concatenate(parts_s), np.concatenate(parts_g))),
        shape=(n_states, n_groups),
    )
    out = (weights @ grouped).tocsr().astype(np.float32)
    out.eliminate_zeros()
    out.sort_indices()
    return out
