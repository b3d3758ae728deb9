"""Patient states × plan items: the matrices every recommender of this package reads.

A **patient state** is one index encounter seen from its ``index_time``: the
patient's profile, her events recorded (``recorded_time``) at or before
``index_time``, and the plans of her encounters that ended at or before
``index_time`` (so the index encounter's own plan, which ends at ``index_time``,
is part of it). Nothing recorded after ``index_time`` is read. Its **targets** are the plan items of the next encounter
(``plan_items.encounter_id == next_encounter_id``).

Every matrix has one row per state, in the order of :attr:`PatientStates.keys`:

==============  ==========================  ===========================================
matrix          shape                       values (float32, CSR)
==============  ==========================  ===========================================
``features``    (n_states, n_features)      profile, pregnancy, active conditions and
                                            medications, recent events, counts per kind,
                                            previous-plan and decayed plan-history items
``history``     (n_states, n_items)         decayed count of each item in earlier plans
                                            and in coded events (half-life in settings)
``last_plan``   (n_states, n_items)         1 for the items of the latest plan at or
                                            before ``index_time``
``targets``     (n_states, n_items)         1 for the items of the next encounter's plan
==============  ==========================  ===========================================

The :class:`Vocabulary` (items, features, and the settings that define the
features) is built from TRAIN patients only and saved with every model, so that
states of unseen patients are built into the same columns without refitting.

Usage::

    tables = CohortTables.from_workspace("pmlm-workspace")
    states = build_dataset(tables)               # every index encounter
    train, test = states.split("train"), states.split("test")
    new = build_states(tables, states.vocab)     # same columns, e.g. after new records
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from pipelines.workspace import Workspace
from recsys.type_aliases import IndexVector, Mask, SparseMatrix

US_PER_DAY = 86_400_000_000
#: Stand-in for a missing end time: the interval never ends.
NEVER = np.iinfo(np.int64).max

#: Event kinds that last (onset .. end, or open-ended when the end is missing).
INTERVAL_KINDS = ("condition", "medication", "careplan", "allergy")
#: Event kinds that happen at one time; they count as features while recent.
POINT_KINDS = ("procedure", "immunization", "observation")
PREGNANCY_DISPLAY = r"(?i)pregnan"
PREGNANCY_CODES = frozenset({"72892002", "77386006", "237240001"})

#: Columns of :attr:`PatientStates.keys`.
STATE_KEY_COLUMNS = (
    "encounter_id",
    "patient_id",
    "index_time",
    "next_encounter_id",
    "next_time",
    "split",
    "is_obstetric",
    "is_adult",
    "age_years",
    "index_us",
    "next_us",
)


@dataclass(frozen=True)
class StateSettings:
    """How states are turned into features; saved in the vocabulary with the model."""

    history_half_life_days: float = 365.0
    recent_days: float = 365.0
    age_band_years: int = 5
    #: an item enters the vocabulary when at least this many TRAIN patients had it in a plan
    min_item_patients: int = 1
    #: a feature enters the vocabulary when at least this many TRAIN states have it
    min_feature_states: int = 2
    #: bound on the (state, event-time) pairs materialized at once
    max_pairs_per_chunk: int = 4_000_000


@dataclass(frozen=True)
class Vocabulary:
    """Item and feature columns, with human-readable labels, fixed at fit time."""

    items: tuple[str, ...]
    item_displays: tuple[str, ...]
    item_kinds: tuple[str, ...]
    features: tuple[str, ...]
    feature_displays: tuple[str, ...]
    settings: StateSettings = field(default_factory=StateSettings)

    def __post_init__(self) -> None:
        if not (len(self.items) == len(self.item_displays) == len(self.item_kinds)):
            raise ValueError("items, item_displays and item_kinds must have the same length")
        if len(self.features) != len(self.feature_displays):
            raise ValueError("features and feature_displays must have the same length")

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def fingerprint(self) -> str:
        """A short hash of the columns and settings: equal fingerprints mean same matrices."""
        digest = hashlib.sha256()
        digest.update("\x1f".join(self.items).encode())
        digest.update(b"\x1e")
        digest.update("\x1f".join(self.features).encode())
        digest.update(json.dumps(asdict(self.settings), sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def item_index(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.items)}

    def feature_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.features)}

    def to_json(self) -> dict[str, Any]:
        return {
            "items": list(self.items),
            "item_displays": list(self.item_displays),
            "item_kinds": list(self.item_kinds),
            "features": list(self.features),
            "feature_displays": list(self.feature_displays),
            "settings": asdict(self.settings),
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Vocabulary:
        vocab = cls(
            items=tuple(data["items"]),
            item_displays=tuple(data["item_displays"]),
            item_kinds=tuple(data["item_kinds"]),
            features=tuple(data["features"]),
            feature_displays=tuple(data["feature_displays"]),
            settings=StateSettings(**data.get("settings", {})),
        )
        if "fingerprint" in data and data["fingerprint"] != vocab.fingerprint:
            raise ValueError("vocabulary file is inconsistent with its fingerprint")
        return vocab


@dataclass(frozen=True)
class PatientStates:
    """Patient states (one per index encounter) as aligned sparse matrices.

    Attributes:
        keys: one row per state (``STATE_KEY_COLUMNS``); ``index_us``/``next_us`` are
            the index and next-encounter times in int64 microseconds since the epoch.
        features: (n_states, n_features) float32 CSR.
        history: (n_states, n_items) float32 CSR, decayed item counts before ``index_time``.
        last_plan: (n_states, n_items) float32 CSR, 0/1.
        targets: (n_states, n_items) float32 CSR 0/1, or None for states without a next plan.
        n_true: (n_states,) int64, distinct next-plan items including those outside the
            vocabulary (the recall denominator), or None.
        vocab: the columns.
    """

    keys: pd.DataFrame
    features: SparseMatrix
    history: SparseMatrix
    last_plan: SparseMatrix
    targets: SparseMatrix | None
    n_true: IndexVector | None
    vocab: Vocabulary

    def __post_init__(self) -> None:
        n = len(self.keys)
        shapes = {
            "features": (self.features.shape, (n, self.vocab.n_features)),
            "history": (self.history.shape, (n, self.vocab.n_items)),
            "last_plan": (self.last_plan.shape, (n, self.vocab.n_items)),
        }
        if self.targets is not None:
            shapes["targets"] = (self.targets.shape, (n, self.vocab.n_items))
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise ValueError(f"{name} has shape {got}, expected {want}")
        if (self.targets is None) != (self.n_true is None):
            raise ValueError("targets and n_true go together")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_items(self) -> int:
        return self.vocab.n_items

    @property
    def n_features(self) -> int:
        return self.vocab.n_features

    def require_targets(self) -> tuple[SparseMatrix, IndexVector]:
        """The targets and ``n_true``; ValueError when these states have none."""
        if self.targets is None or self.n_true is None:
            raise ValueError("these patient states have no targets (next-plan items)")
        return self.targets, self.n_true

    def subset(self, rows: IndexVector | Mask | Sequence[int]) -> PatientStates:
        """The states at ``rows`` (positions or a boolean mask), in that order."""
        index = np.asarray(rows)
        if index.dtype == np.bool_:
            index = np.flatnonzero(index)
        index = index.astype(np.int64)
        return PatientStates(
            keys=self.keys.iloc[index].reset_index(drop=True),
            features=_rows(self.features, index),
            history=_rows(self.history, index),
            last_plan=_rows(self.last_plan, index),
            targets=None if self.targets is None else _rows(self.targets, index),
            n_true=None if self.n_true is None else self.n_true[index],
            vocab=self.vocab,
        )

    def split(self, name: str) -> PatientStates:
        """The states of one patient split (``train``, ``validation`` or ``test``)."""
        return self.subset((self.keys["split"] == name).to_numpy())

    @property
    def obstetric(self) -> Mask:
        return self.keys["is_obstetric"].to_numpy(dtype=bool)


def _rows(matrix: SparseMatrix, index: IndexVector) -> SparseMatrix:
    out: SparseMatrix = matrix[index]
    out.sort_indices()
    return out


@dataclass(frozen=True)
class CohortTables:
    """The canonical tables the states are built from (pandas frames, as read)."""

    index_encounters: pd.DataFrame
    plan_items: pd.DataFrame
    events: pd.DataFrame
    encounters: pd.DataFrame
    patients: pd.DataFrame

    @classmethod
    def from_frames(cls, frames: Mapping[str, pd.DataFrame]) -> CohortTables:
        return cls(
            index_encounters=frames["index_encounters"],
            plan_items=frames["plan_items"],
            events=frames["events"],
            encounters=frames["encounters"],
            patients=frames["patients"],
        )

    @classmethod
    def from_workspace(cls, workspace: Workspace | Path | str) -> CohortTables:
        ws = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
        names = ("index_encounters", "plan_items", "events", "encounters", "patients")
        return cls.from_frames({name: ws.read_table(name) for name in names})


# --------------------------------------------------------------------------- time


def micros(values: pd.Series, missing: int = NEVER) -> npt.NDArray[np.int64]:
    """UTC timestamps → int64 microseconds since the epoch; missing values → ``missing``."""
    stamps = pd.to_datetime(values, utc=True).dt.as_unit("us")
    out = np.asarray(stamps.array.asi8, dtype=np.int64).copy()
    out[stamps.isna().to_numpy()] = missing
    return out


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _Block:
    """A group of candidate feature columns: names, labels and (n_states, n) values."""

    names: list[str]
    displays: list[str]
    matrix: SparseMatrix


@dataclass(frozen=True)
class _Prepared:
    keys: pd.DataFrame
    pid: npt.NDArray[np.int64]  # patient code per state
    patient_codes: dict[str, int]
    plans: pd.DataFrame  # pid, t, plan_encounter_id, item_key, kind, display
    # pid, t (recorded), onset, end, kind, key, display, code_system, code
    events: pd.DataFrame
    encounters: pd.DataFrame  # pid, encounter_id, t, class_code, type_key, type_display


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


def _prepare(tables: CohortTables) -> _Prepared:
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
    return _Prepared(keys, pid, codes, plans, events, encounters)


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


def _time_weighted_sum(
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


def _most_common(keys: pd.Series, values: pd.Series) -> dict[str, str]:
    """key → its most frequent value (ties: the smallest value)."""
    frame = pd.DataFrame(
        {"key": keys.astype("str").to_numpy(), "value": values.fillna("").astype("str").to_numpy()}
    )
    counts = frame.groupby(["key", "value"], sort=True).size().reset_index(name="n")
    counts = counts.sort_values(["key", "n"], ascending=[True, False], kind="stable")
    first = counts.drop_duplicates("key")
    return dict(zip(first["key"], first["value"], strict=True))


def _factorize(values: pd.Series | npt.NDArray[Any]) -> tuple[npt.NDArray[np.int64], list[str]]:
    codes, uniques = pd.factorize(pd.Series(values), sort=True)
    return codes.astype(np.int64), [str(u) for u in uniques]


def _indicator_block(
    n_states: int,
    state: npt.NDArray[np.int64],
    names: pd.Series,
    displays: Mapping[str, str] | None = None,
    values: npt.NDArray[np.floating[Any]] | None = None,
) -> _Block:
    codes, uniques = _factorize(names)
    data = np.ones(len(codes)) if values is None else np.asarray(values, dtype=np.float64)
    matrix = sp.csr_matrix((data, (state, codes)), shape=(n_states, len(uniques)))
    matrix.data = np.minimum(matrix.data, 1.0) if values is None else matrix.data
    labels = [(displays or {}).get(u, u) for u in uniques]
    return _Block(uniques, labels, matrix.astype(np.float32).tocsr())


def _profile_block(prep: _Prepared, settings: StateSettings) -> _Block:
    keys = prep.keys
    n = len(keys)
    state = np.arange(n, dtype=np.int64)
    band = settings.age_band_years
    age = keys["age_years"].to_numpy(dtype=float)
    lower = np.floor(np.nan_to_num(age, nan=-1.0) / band).astype(np.int64) * band
    age_names = pd.Series(
        [f"age:{lo}-{lo + band - 1}" if lo >= 0 else "age:unknown" for lo in lower]
    )
    names = [age_names]
    states = [state]

    obstetric = keys["is_obstetric"].to_numpy(dtype=bool)
    names.append(pd.Series(["profile:obstetric_encounter"] * int(obstetric.sum())))
    states.append(state[obstetric])

    enc = prep.encounters.drop_duplicates("encounter_id").set_index("encounter_id")
    at_index = keys["encounter_id"].map(enc["class_code"])
    known = at_index.notna().to_numpy()
    names.append("encounter_class:" + at_index[known].astype("str").reset_index(drop=True))
    states.append(state[known])
    type_key = keys["encounter_id"].map(enc["type_key"])
    names.append("encounter_type:" + type_key[known].astype("str").reset_index(drop=True))
    states.append(state[known])

    # days since the previous encounter started (only encounters at or before index_time)
    ordered = prep.encounters.sort_values(["pid", "t", "encounter_id"])
    previous_t = ordered.groupby("pid")["t"].shift(1)
    previous = pd.Series(previous_t.to_numpy(), index=ordered["encounter_id"].to_numpy())
    previous = previous[~previous.index.duplicated()]
    start_t = keys["encounter_id"].map(enc["t"])
    gap_days = (start_t - keys["encounter_id"].map(previous)) / US_PER_DAY
    gap = np.select(
        [gap_days.isna(), gap_days <= 7, gap_days <= 30, gap_days <= 90, gap_days <= 365],
        ["none", "0-7d", "8-30d", "31-90d", "91-365d"],
        "over_1y",
    )
    names.append(pd.Series([f"gap_since_previous:{g}" for g in gap[known]]))
    states.append(state[known])

    recent = _time_weighted_sum(
        prep.pid,
        keys["index_us"].to_numpy(),
        prep.encounters["pid"].to_numpy(),
        prep.encounters["t"].to_numpy(),
        np.zeros(len(prep.encounters), dtype=np.int64),
        np.ones(len(prep.encounters)),
        1,
        window_us=settings.recent_days * US_PER_DAY,
        max_pairs=settings.max_pairs_per_chunk,
    )
    count = np.asarray(recent.toarray()).ravel()
    bucket = np.select([count <= 1, count <= 3, count <= 7], ["1", "2-3", "4-7"], "8+")
    names.append(pd.Series([f"encounters_past_year:{b}" for b in bucket]))
    states.append(state)

    all_names = pd.concat(names, ignore_index=True)
    type_labels = dict(zip(enc["type_key"], enc["type_display"], strict=True))
    displays = {name: _profile_label(name, type_labels) for name in pd.unique(all_names)}
    return _indicator_block(n, np.concatenate(states), all_names, displays)


_GAP_LABELS = {
    "none": "first recorded visit",
    "0-7d": "previous visit 0-7 days earlier",
    "8-30d": "previous visit 8-30 days earlier",
    "31-90d": "previous visit 31-90 days earlier",
    "91-365d": "previous visit 91-365 days earlier",
    "over_1y": "previous visit over a year earlier",
}


def _profile_label(name: str, type_labels: Mapping[str, str]) -> str:
    group, _, value = name.partition(":")
    if group == "age":
        return "age unknown" if value == "unknown" else f"age {value}"
    if group == "profile":
        return "this visit is obstetric"
    if group == "encounter_class":
        return f"visit class {value}"
    if group == "encounter_type":
        return f"visit type: {type_labels.get(value) or value}"
    if group == "gap_since_previous":
        return _GAP_LABELS.get(value, name)
    if group == "encounters_past_year":
        return f"{value} visits in the past year"
    return name


def _event_blocks(prep: _Prepared, settings: StateSettings) -> list[_Block]:
    keys = prep.keys
    n = len(keys)
    ev = prep.events
    s_pid, s_t = prep.pid, keys["index_us"].to_numpy()
    window = settings.recent_days * US_PER_DAY
    chunk = settings.max_pairs_per_chunk
    blocks: list[_Block] = []
    if ev.empty:
        return blocks

    names = ev["kind"].astype("str") + ":" + ev["key"].astype("str")
    col, uniques = _factorize(names)
    display = _most_common(names, ev["display"])
    labels = [f"{name.split(':', 1)[0]}: {display.get(name, '') or name}" for name in uniques]
    pid, t, end = ev["pid"].to_numpy(), ev["t"].to_numpy(), ev["end"].to_numpy()
    ones = np.ones(len(ev))
    is_interval = ev["kind"].isin(INTERVAL_KINDS).to_numpy()

    point = ~is_interval
    recent_point = _time_weighted_sum(
        s_pid, s_t, pid[point], t[point], col[point], ones[point], len(uniques),
        window_us=window, max_pairs=chunk,
    )  # fmt: skip
    # interval kinds: active (started, not yet ended) or started recently
    iv = is_interval
    started = _time_weighted_sum(
        s_pid, s_t, pid[iv], t[iv], col[iv], ones[iv], len(uniques), max_pairs=chunk
    )
    has_end = iv & (end != NEVER)
    # an end is known once it happened and the event itself was recorded
    known_end = np.maximum(end, t)
    ended = _time_weighted_sum(
        s_pid, s_t, pid[has_end], known_end[has_end], col[has_end], ones[has_end], len(uniques),
        max_pairs=chunk,
    )  # fmt: skip
    recent_iv = _time_weighted_sum(
        s_pid, s_t, pid[iv], t[iv], col[iv], ones[iv], len(uniques),
        window_us=window, max_pairs=chunk,
    )  # fmt: skip
    active = started - ended
    active.data = (active.data > 0).astype(np.float32)
    present = (recent_point + active + recent_iv).tocsr()
    present.data = (present.data > 0).astype(np.float32)
    present.eliminate_zeros()
    blocks.append(_Block(uniques, labels, present.astype(np.float32)))

    # how busy the past year was, per kind: log-scaled counts in [0, 1]
    kind_col, kinds = _factorize(ev["kind"])
    counts = _time_weighted_sum(
        s_pid, s_t, pid, t, kind_col, ones, len(kinds), window_us=window, max_pairs=chunk
    )
    counts.data = np.minimum(np.log1p(counts.data) / np.log(101.0), 1.0).astype(np.float32)
    blocks.append(
        _Block(
            [f"count_past_year:{k}" for k in kinds],
            [f"{k} events in the past year (log scale)" for k in kinds],
            counts,
        )
    )

    # pregnancy: an active pregnancy condition and how far along it is
    pregnant = (
        (ev["kind"] == "condition")
        & (
            ev["display"].astype("str").str.contains(PREGNANCY_DISPLAY, regex=True)
            | ev["code"].isin(PREGNANCY_CODES)
        )
    ).to_numpy()
    if pregnant.any():
        conditions = ev.loc[pregnant, ["pid", "t", "onset", "end"]]
        states = pd.DataFrame({"pid": s_pid, "ts": s_t, "state": np.arange(n)})
        pairs = states.merge(conditions, on="pid")
        weeks = (pairs["ts"] - pairs["onset"]) / (7 * US_PER_DAY)
        open_ended = pairs["end"] == NEVER
        recorded = pairs["t"] <= pairs["ts"]
        active_now = (
            recorded
            & (weeks >= 0)
            & ((~open_ended & (pairs["end"] > pairs["ts"])) | (open_ended & (weeks <= 44)))
        )
        pairs = pairs.assign(weeks=weeks)[active_now]
        latest = pairs.sort_values("t").groupby("state").tail(1)
        w = latest["weeks"].to_numpy()
        stage = np.select([w < 13, w < 28], ["weeks_0-12", "weeks_13-27"], "weeks_28+")
        state_idx = latest["state"].to_numpy(dtype=np.int64)
        preg_names = pd.Series(
            ["pregnancy:active"] * len(latest) + [f"pregnancy:{s}" for s in stage]
        )
        preg_labels = {
            "pregnancy:active": "pregnant (a pregnancy is on record)",
            "pregnancy:weeks_0-12": "pregnancy weeks 0-12",
            "pregnancy:weeks_13-27": "pregnancy weeks 13-27",
            "pregnancy:weeks_28+": "pregnancy week 28 or later",
        }
        blocks.append(
            _indicator_block(n, np.concatenate([state_idx, state_idx]), preg_names, preg_labels)
        )
    return blocks


def _item_vocabulary(
    prep: _Prepared, train_patients: npt.NDArray[np.int64], settings: StateSettings
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    plans = prep.plans[np.isin(prep.plans["pid"].to_numpy(), train_patients)]
    support = plans.groupby("item_key")["pid"].nunique()
    support = support[support >= settings.min_item_patients]
    order = sorted(support.index, key=lambda k: (-int(support[k]), str(k)))
    displays = _most_common(plans["item_key"], plans["display"])
    kinds = _most_common(plans["item_key"], plans["kind"])
    return (
        tuple(str(k) for k in order),
        tuple(str(displays[k]) for k in order),
        tuple(str(kinds[k]) for k in order),
    )


def _plan_matrices(
    prep: _Prepared, item_index: Mapping[str, int], settings: StateSettings
) -> tuple[SparseMatrix, SparseMatrix, SparseMatrix, IndexVector]:
    """history, last_plan, targets (n_states × n_items) and n_true (n_states,)."""
    keys = prep.keys
    n, v = len(keys), len(item_index)
    s_t = keys["index_us"].to_numpy()
    plans = prep.plans
    col = plans["item_key"].map(item_index)
    in_vocab = col.notna().to_numpy()
    p = plans[in_vocab]
    p_col = col[in_vocab].to_numpy(dtype=np.int64)

    # coded events that are the same thing as a plan item (e.g. the procedure done)
    coded = (
        prep.plans[["code_system", "code", "item_key"]]
        .dropna()
        .drop_duplicates(["code_system", "code"])
    )
    ev = prep.events.merge(coded, on=["code_system", "code"], how="inner")
    e_col = ev["item_key"].map(item_index)
    e_keep = e_col.notna().to_numpy()
    occ_pid = np.concatenate([p["pid"].to_numpy(), ev["pid"].to_numpy()[e_keep]])
    occ_t = np.concatenate([p["t"].to_numpy(), ev["t"].to_numpy()[e_keep]])
    occ_col = np.concatenate([p_col, e_col[e_keep].to_numpy(dtype=np.int64)])
    history = _time_weighted_sum(
        prep.pid,
        s_t,
        occ_pid,
        occ_t,
        occ_col,
        np.ones(len(occ_pid)),
        v,
        half_life_us=settings.history_half_life_days * US_PER_DAY,
        max_pairs=settings.max_pairs_per_chunk,
    )

    # the latest plan that started at or before index_time
    plan_enc = (
        prep.plans[["pid", "t", "plan_encounter_id"]]
        .drop_duplicates("plan_encounter_id")
        .sort_values(["t", "plan_encounter_id"], kind="stable")
    )
    states = pd.DataFrame(
        {"pid": prep.pid, "t": s_t, "state": np.arange(n, dtype=np.int64)}
    ).sort_values("t", kind="stable")
    latest = pd.merge_asof(
        states, plan_enc, on="t", by="pid", direction="backward", allow_exact_matches=True
    ).dropna(subset=["plan_encounter_id"])
    last_items = latest[["state", "plan_encounter_id"]].merge(
        p.assign(col=p_col)[["plan_encounter_id", "col"]], on="plan_encounter_id"
    )
    last_plan = _binary(last_items["state"].to_numpy(), last_items["col"].to_numpy(), (n, v))

    # targets: the next encounter's plan
    targets_long = (
        pd.DataFrame({"state": np.arange(n), "encounter_id": keys["next_encounter_id"].to_numpy()})
        .merge(
            prep.plans[["plan_encounter_id", "item_key"]].rename(
                columns={"plan_encounter_id": "encounter_id"}
            ),
            on="encounter_id",
        )
        .drop_duplicates(["state", "item_key"])
    )
    n_true = np.bincount(targets_long["state"].to_numpy(dtype=np.int64), minlength=n).astype(
        np.int64
    )
    t_col = targets_long["item_key"].map(item_index)
    t_keep = t_col.notna().to_numpy()
    targets = _binary(
        targets_long["state"].to_numpy()[t_keep], t_col[t_keep].to_numpy(dtype=np.int64), (n, v)
    )
    return history, last_plan, targets, n_true


def _binary(rows: npt.NDArray[Any], cols: npt.NDArray[Any], shape: tuple[int, int]) -> SparseMatrix:
    matrix = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows.astype(np.int64), cols.astype(np.int64))),
        shape=shape,
    )
    matrix.data[:] = 1.0
    matrix.sort_indices()
    return matrix


def _history_blocks(
    history: SparseMatrix, last_plan: SparseMatrix, items: Sequence[str], displays: Sequence[str]
) -> list[_Block]:
    squashed = history.copy()
    squashed.data = (1.0 - np.exp(-squashed.data)).astype(np.float32)
    return [
        _Block(
            [f"last_plan:{k}" for k in items],
            [f"in the latest plan: {d}" for d in displays],
            last_plan.astype(np.float32),
        ),
        _Block(
            [f"history:{k}" for k in items],
            [f"in earlier plans or records: {d}" for d in displays],
            squashed,
        ),
    ]


def _candidate_blocks(
    prep: _Prepared,
    items: Sequence[str],
    item_displays: Sequence[str],
    settings: StateSettings,
) -> tuple[list[_Block], SparseMatrix, SparseMatrix, SparseMatrix, IndexVector]:
    item_index = {k: i for i, k in enumerate(items)}
    history, last_plan, targets, n_true = _plan_matrices(prep, item_index, settings)
    blocks = [_profile_block(prep, settings)]
    blocks += _event_blocks(prep, settings)
    blocks += _history_blocks(history, last_plan, items, item_displays)
    return blocks, history, last_plan, targets, n_true


def _assemble(blocks: Sequence[_Block], feature_index: Mapping[str, int], n: int) -> SparseMatrix:
    """Place each block's columns at their vocabulary positions; unknown columns drop."""
    rows, cols, vals = [], [], []
    for block in blocks:
        mapping = np.array([feature_index.get(name, -1) for name in block.names], dtype=np.int64)
        coo = block.matrix.tocoo()
        target = mapping[coo.col] if len(mapping) else np.zeros(0, dtype=np.int64)
        keep = target >= 0
        rows.append(coo.row[keep].astype(np.int64))
        cols.append(target[keep])
        vals.append(coo.data[keep].astype(np.float32))
    matrix = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, len(feature_index)),
        dtype=np.float32,
    )
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix


def build_dataset(
    tables: CohortTables, settings: StateSettings | None = None, train_split: str = "train"
) -> PatientStates:
    """Every index encounter as a patient state, with a vocabulary built from TRAIN patients.

    Items enter the vocabulary when at least ``settings.min_item_patients`` train patients
    had them in a plan; features when at least ``settings.min_feature_states`` train
    states have them. Validation and test patients only contribute rows.

    Returns: :class:`PatientStates` with targets, rows sorted by (patient_id, index_time).
    """
    settings = settings or StateSettings()
    prep = _prepare(tables)
    train_mask = (prep.keys["split"] == train_split).to_numpy()
    if not train_mask.any():
        raise ValueError(f"no index encounters in split {train_split!r}")
    items, item_displays, item_kinds = _item_vocabulary(
        prep, np.unique(prep.pid[train_mask]), settings
    )
    blocks, history, last_plan, targets, n_true = _candidate_blocks(
        prep, items, item_displays, settings
    )
    features: list[str] = []
    displays: list[str] = []
    for block in blocks:
        support = np.diff(block.matrix[np.flatnonzero(train_mask)].tocsc().indptr)
        for name, label, count in zip(block.names, block.displays, support, strict=True):
            if count >= settings.min_feature_states:
                features.append(name)
                displays.append(label)
    vocab = Vocabulary(items, item_displays, item_kinds, tuple(features), tuple(displays), settings)
    matrix = _assemble(blocks, vocab.feature_index(), len(prep.keys))
    return PatientStates(prep.keys, matrix, history, last_plan, targets, n_true, vocab)


def build_states(
    tables: CohortTables, vocab: Vocabulary, index_encounters: pd.DataFrame | None = None
) -> PatientStates:
    """States for ``index_encounters`` (default: all of ``tables``) in ``vocab``'s columns.

    This is how a fitted model sees patients it was not trained on: items and
    features outside the vocabulary are dropped, nothing is refitted.
    """
    if index_encounters is not None:
        tables = CohortTables(
            index_encounters, tables.plan_items, tables.events, tables.encounters, tables.patients
        )
    prep = _prepare(tables)
    blocks, history, last_plan, targets, n_true = _candidate_blocks(
        prep, vocab.items, vocab.item_displays, vocab.settings
    )
    matrix = _assemble(blocks, vocab.feature_index(), len(prep.keys))
    return PatientStates(prep.keys, matrix, history, last_plan, targets, n_true, vocab)


def bootstrap_states(
    states: PatientStates,
    n_states: int,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> PatientStates:
    """Resample whole patients (with replacement) under new ids until ``n_states`` rows.

    Each drawn patient keeps all her states (times, matrices, targets) and gets a new
    ``patient_id``/``encounter_id`` suffix ``~<copy>`` and a new split, drawn per new
    patient with ``split_fractions``. Used by the scale benchmark.
    """
    rng = np.random.default_rng(seed)
    patient_rows = states.keys.groupby("patient_id", sort=True).indices
    patients = list(patient_rows)
    picks: list[npt.NDArray[np.int64]] = []
    copy_ids: list[npt.NDArray[np.int64]] = []
    total, copy = 0, 0
    while total < n_states:
        batch = rng.integers(0, len(patients), size=max(16, (n_states - total) // 4 + 1))
        for b in batch:
            rows = np.asarray(patient_rows[patients[b]], dtype=np.int64)
            picks.append(rows)
            copy_ids.append(np.full(len(rows), copy, dtype=np.int64))
            copy += 1
            total += len(rows)
            if total >= n_states:
                break
    rows = np.concatenate(picks)[:n_states]
    copies = np.concatenate(copy_ids)[:n_states]
    out = states.subset(rows)
    keys = out.keys.copy()
    suffix = pd.Series(copies).map(lambda c: f"~{c}")
    keys["patient_id"] = keys["patient_id"].astype("str") + suffix
    keys["encounter_id"] = keys["encounter_id"].astype("str") + suffix
    keys["next_encounter_id"] = keys["next_encounter_id"].astype("str") + suffix
    n_copies = int(copies.max()) + 1
    split_of_copy = rng.choice(
        np.array(["train", "validation", "test"]), size=n_copies, p=np.asarray(split_fractions)
    )
    keys["split"] = split_of_copy[copies]
    return PatientStates(
        keys, out.features, out.history, out.last_plan, out.targets, out.n_true, out.vocab
    )
