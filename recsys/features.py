"""Candidate feature columns of patient states, in blocks: profile, events, pregnancy, plans.

Each block is a group of named columns with their labels and a sparse
(n_states, n) matrix; :func:`assemble` places the columns a vocabulary keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from recsys.states import NEVER, US_PER_DAY, StateSettings
from recsys.timeline import Prepared, time_weighted_sum
from recsys.type_aliases import SparseMatrix

#: Event kinds that last (onset .. end, or open-ended when the end is missing).
INTERVAL_KINDS = ("condition", "medication", "careplan", "allergy")
#: Event kinds that happen at one time; they count as features while recent.
POINT_KINDS = ("procedure", "immunization", "observation")


@dataclass(frozen=True)
class Block:
    """A group of candidate feature columns: names, labels and (n_states, n) values."""

    names: list[str]
    displays: list[str]
    matrix: SparseMatrix


def most_common(keys: pd.Series, values: pd.Series) -> dict[str, str]:
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
) -> Block:
    codes, uniques = _factorize(names)
    data = np.ones(len(codes)) if values is None else np.asarray(values, dtype=np.float64)
    matrix = sp.csr_matrix((data, (state, codes)), shape=(n_states, len(uniques)))
    matrix.data = np.minimum(matrix.data, 1.0) if values is None else matrix.data
    labels = [(displays or {}).get(u, u) for u in uniques]
    return Block(uniques, labels, matrix.astype(np.float32).tocsr())


def profile_block(prep: Prepared, settings: StateSettings) -> Block:
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

    recent = time_weighted_sum(
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


def event_blocks(prep: Prepared, settings: StateSettings) -> list[Block]:
    keys = prep.keys
    ev = prep.events
    s_pid, s_t = prep.pid, keys["index_us"].to_numpy()
    window = settings.recent_days * US_PER_DAY
    chunk = settings.max_pairs_per_chunk
    blocks: list[Block] = []
    if ev.empty:
        return blocks

    names = ev["kind"].astype("str") + ":" + ev["key"].astype("str")
    col, uniques = _factorize(names)
    display = most_common(names, ev["display"])
    labels = [f"{name.split(':', 1)[0]}: {display.get(name, '') or name}" for name in uniques]
    pid, t, end = ev["pid"].to_numpy(), ev["t"].to_numpy(), ev["end"].to_numpy()
    ones = np.ones(len(ev))
    is_interval = ev["kind"].isin(INTERVAL_KINDS).to_numpy()

    point = ~is_interval
    recent_point = time_weighted_sum(
        s_pid, s_t, pid[point], t[point], col[point], ones[point], len(uniques),
        window_us=window, max_pairs=chunk,
    )  # fmt: skip
    # interval kinds: active (started, not yet ended) or started recently
    iv = is_interval
    started = time_weighted_sum(
        s_pid, s_t, pid[iv], t[iv], col[iv], ones[iv], len(uniques), max_pairs=chunk
    )
    has_end = iv & (end != NEVER)
    # an end is known once it happened and the event itself was recorded
    known_end = np.maximum(end, t)
    ended = time_weighted_sum(
        s_pid, s_t, pid[has_end], known_end[has_end], col[has_end], ones[has_end], len(uniques),
        max_pairs=chunk,
    )  # fmt: skip
    recent_iv = time_weighted_sum(
        s_pid, s_t, pid[iv], t[iv], col[iv], ones[iv], len(uniques),
        window_us=window, max_pairs=chunk,
    )  # fmt: skip
    active = started - ended
    active.data = (active.data > 0).astype(np.float32)
    present = (recent_point + active + recent_iv).tocsr()
    present.data = (present.data > 0).astype(np.float32)
    present.eliminate_zeros()
    blocks.append(Block(uniques, labels, present.astype(np.float32)))

    # how busy the past year was, per kind: log-scaled counts in [0, 1]
    kind_col, kinds = _factorize(ev["kind"])
    counts = time_weighted_sum(
        s_pid, s_t, pid, t, kind_col, ones, len(kinds), window_us=window, max_pairs=chunk
    )
    counts.data = np.minimum(np.log1p(counts.data) / np.log(101.0), 1.0).astype(np.float32)
    blocks.append(
        Block(
            [f"count_past_year:{k}" for k in kinds],
            [f"{k} events in the past year (log scale)" for k in kinds],
            counts,
        )
    )
    return blocks


PREGNANCY_LABELS = {
    "pregnancy:active": "pregnant (a pregnancy is on record)",
    "pregnancy:weeks_0-12": "pregnancy weeks 0-12",
    "pregnancy:weeks_13-27": "pregnancy weeks 13-27",
    "pregnancy:weeks_28+": "pregnancy week 28 or later",
}


def pregnancy_blocks(prep: Prepared) -> list[Block]:
    """Pregnant at index time (the rule of `pipelines.clinical`), and how far along."""
    pregnant = prep.pregnancy["pregnant"].to_numpy(dtype=bool)
    if not pregnant.any():
        return []
    weeks = prep.pregnancy["weeks"].to_numpy(dtype=float)[pregnant]
    stage = np.select([weeks < 13, weeks < 28], ["weeks_0-12", "weeks_13-27"], "weeks_28+")
    state = np.flatnonzero(pregnant).astype(np.int64)
    names = pd.Series(["pregnancy:active"] * len(state) + [f"pregnancy:{s}" for s in stage])
    return [
        _indicator_block(len(prep.keys), np.concatenate([state, state]), names, PREGNANCY_LABELS)
    ]


def history_blocks(
    history: SparseMatrix, last_plan: SparseMatrix, items: Sequence[str], displays: Sequence[str]
) -> list[Block]:
    squashed = history.copy()
    squashed.data = (1.0 - np.exp(-squashed.data)).astype(np.float32)
    return [
        Block(
            [f"last_plan:{k}" for k in items],
            [f"in the latest plan: {d}" for d in displays],
            last_plan.astype(np.float32),
        ),
        Block(
            [f"history:{k}" for k in items],
            [f"in earlier plans or records: {d}" for d in displays],
            squashed,
        ),
    ]


def assemble(blocks: Sequence[Block], feature_index: Mapping[str, int], n: int) -> SparseMatrix:
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
