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

This module builds the states; the pieces live by job: :mod:`recsys.states`
(the types, re-exported here), :mod:`recsys.timeline` (tables as coded
per-patient timelines, sums as of each state) and :mod:`recsys.features` (the
candidate feature blocks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from recsys.features import (
    Block,
    assemble,
    event_blocks,
    history_blocks,
    most_common,
    pregnancy_blocks,
    profile_block,
)
from recsys.states import (
    STATE_KEY_COLUMNS,
    US_PER_DAY,
    CohortTables,
    PatientStates,
    StateSettings,
    Vocabulary,
    bootstrap_states,
    micros,
)
from recsys.timeline import Prepared, prepare, time_weighted_sum
from recsys.type_aliases import IndexVector, SparseMatrix

__all__ = [
    "STATE_KEY_COLUMNS",
    "CohortTables",
    "PatientStates",
    "StateSettings",
    "Vocabulary",
    "bootstrap_states",
    "build_dataset",
    "build_states",
    "micros",
]


def _item_vocabulary(
    prep: Prepared, train_patients: npt.NDArray[np.int64], settings: StateSettings
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    plans = prep.plans[np.isin(prep.plans["pid"].to_numpy(), train_patients)]
    support = plans.groupby("item_key")["pid"].nunique()
    support = support[support >= settings.min_item_patients]
    order = sorted(support.index, key=lambda k: (-int(support[k]), str(k)))
    displays = most_common(plans["item_key"], plans["display"])
    kinds = most_common(plans["item_key"], plans["kind"])
    return (
        tuple(str(k) for k in order),
        tuple(str(displays[k]) for k in order),
        tuple(str(kinds[k]) for k in order),
    )


def _plan_matrices(
    prep: Prepared, item_index: Mapping[str, int], settings: StateSettings
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
    history = time_weighted_sum(
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


def _candidate_blocks(
    prep: Prepared,
    items: Sequence[str],
    item_displays: Sequence[str],
    settings: StateSettings,
) -> tuple[list[Block], SparseMatrix, SparseMatrix, SparseMatrix, IndexVector]:
    item_index = {k: i for i, k in enumerate(items)}
    history, last_plan, targets, n_true = _plan_matrices(prep, item_index, settings)
    blocks = [profile_block(prep, settings)]
    blocks += event_blocks(prep, settings)
    blocks += pregnancy_blocks(prep)
    blocks += history_blocks(history, last_plan, items, item_displays)
    return blocks, history, last_plan, targets, n_true


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
    prep = prepare(tables)
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
    matrix = assemble(blocks, vocab.feature_index(), len(prep.keys))
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
    prep = prepare(tables)
    blocks, history, last_plan, targets, n_true = _candidate_blocks(
        prep, vocab.items, vocab.item_displays, vocab.settings
    )
    matrix = assemble(blocks, vocab.feature_index(), len(prep.keys))
    return PatientStates(prep.keys, matrix, history, last_plan, targets, n_true, vocab)
