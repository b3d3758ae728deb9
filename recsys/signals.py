"""Self-informed signals and the signals of many states: one function for every caller.

**Self signals**: for each state, the model's top-k next items with their scores
and, when the model can attribute its scores (:attr:`Recommender.explains`), the
features (previous-plan items, active conditions, pregnancy stage, ...) that
push each item's score most. **Peer signals** (`recsys.peers`): the most similar
TRAIN patients and what they received next.

`encounter_signals` computes both for some states with one `SignalSettings`;
the prompt table (`promptenv.prompt_table`), `promptenv.signals.signals_for`,
`recsys.steps.explain_patient` and `signal_batches` all go through it.

Usage::

    own, peers = encounter_signals(model, test_states, train_states, SignalSettings())
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recsys.base import Recommender
from recsys.interactions import PatientStates
from recsys.peers import PeerSignals, peer_signals
from recsys.ranking import coded_labels, take_rows, top_k, unit_rows
from recsys.type_aliases import FloatMatrix, IndexMatrix

#: States scored at once by `self_signals` and queries searched at once by `peer_signals`.
SELF_CHUNK = 8192
PEER_CHUNK = 4096


@dataclass(frozen=True)
class SelfSignals:
    """The model's own predictions for each state.

    Attributes:
        items: one row per (state, rank): ``state`` (row of the input states),
            ``encounter_id``, ``patient_id``, ``rank`` (1 = best), ``item``
            (vocabulary index), ``item_key``, ``item_display``, ``item_kind``, ``score``.
        reasons: one row per (state, rank, reason): ``state``, ``rank``, ``item_key``,
            ``reason_rank``, ``feature``, ``feature_display``, ``contribution`` (> 0).
            Empty when the model cannot attribute its scores.
    """

    items: pd.DataFrame
    reasons: pd.DataFrame


def self_signals(
    model: Recommender,
    states: PatientStates,
    k: int = 10,
    n_reasons: int = 3,
    chunk_size: int = SELF_CHUNK,
) -> SelfSignals:
    """Top-k next items per state, with the features behind each (see :class:`SelfSignals`).

    Scores are computed ``chunk_size`` states at a time, so memory stays
    O(chunk_size × n_items) whatever the number of states.
    """
    vocab = states.vocab
    n = len(states)
    idx_parts: list[IndexMatrix] = []
    score_parts: list[FloatMatrix] = []
    reason_f: list[IndexMatrix] = []
    reason_v: list[FloatMatrix] = []
    for start in range(0, n, chunk_size):
        chunk = states.subset(np.arange(start, min(n, start + chunk_size)))
        idx, scores = top_k(model.score(chunk), k)
        idx_parts.append(idx)
        score_parts.append(scores)
        if n_reasons and model.explains:
            contrib = model.contributions(chunk, idx, n_reasons)
            assert contrib is not None
            reason_f.append(contrib.features)
            reason_v.append(contrib.values)
    kk = min(k, vocab.n_items)
    idx_all = np.concatenate(idx_parts) if idx_parts else np.zeros((0, kk), dtype=np.int64)
    scores_all = np.concatenate(score_parts) if score_parts else np.zeros((0, kk), dtype=np.float32)
    state = np.repeat(np.arange(n, dtype=np.int64), kk)
    rank = np.tile(np.arange(1, kk + 1, dtype=np.int64), n)
    item = idx_all.ravel()
    items = pd.DataFrame(
        {
            "state": state,
            "encounter_id": take_rows(states.keys["encounter_id"], state),
            "patient_id": take_rows(states.keys["patient_id"], state),
            "rank": rank,
            "item": item,
            "item_key": coded_labels(vocab.items, item),
            "item_display": coded_labels(vocab.item_displays, item),
            "item_kind": coded_labels(vocab.item_kinds, item),
            "score": scores_all.ravel(),
        }
    )
    reasons = _reason_frame(states, idx_all, reason_f, reason_v)
    return SelfSignals(items, reasons)


def _reason_frame(
    states: PatientStates,
    items: IndexMatrix,
    features: list[IndexMatrix],
    values: list[FloatMatrix],
) -> pd.DataFrame:
    columns = [
        "state",
        "rank",
        "item_key",
        "reason_rank",
        "feature",
        "feature_display",
        "contribution",
    ]
    if not features:
        return pd.DataFrame({c: [] for c in columns})
    f = np.concatenate(features)  # (n, k, r)
    v = np.concatenate(values)
    state, rank, reason = np.nonzero(f >= 0)
    vocab = states.vocab
    feat = f[state, rank, reason]
    return pd.DataFrame(
        {
            "state": state.astype(np.int64),
            "rank": rank.astype(np.int64) + 1,
            "item_key": coded_labels(vocab.items, items[state, rank]),
            "reason_rank": reason.astype(np.int64) + 1,
            "feature": coded_labels(vocab.features, feat),
            "feature_display": coded_labels(vocab.feature_displays, feat),
            "contribution": v[state, rank, reason],
        }
    )


@dataclass(frozen=True)
class SignalSettings:
    """How many items and peers the signals carry (prompts list fewer)."""

    k_self: int = 15
    n_reasons: int = 3
    n_peers: int = 20
    min_support: int = 5
    max_statements: int | None = 15


def encounter_signals(
    model: Recommender,
    queries: PatientStates,
    pool: PatientStates,
    settings: SignalSettings | None = None,
    *,
    chunk_size: int | None = None,
    num_threads: int = 0,
    query_embeddings: FloatMatrix | None = None,
    pool_embeddings: FloatMatrix | None = None,
) -> tuple[SelfSignals, PeerSignals]:
    """Self and peer signals of ``queries`` (peers from ``pool``, normally the TRAIN states).

    ``chunk_size=1`` scores one state (one query) at a time, so that a row's floats
    never depend on which other rows share its call (the prompt table's batches).
    """
    settings = settings or SignalSettings()
    own = self_signals(
        model,
        queries,
        k=settings.k_self,
        n_reasons=settings.n_reasons,
        chunk_size=chunk_size or SELF_CHUNK,
    )
    peers = peer_signals(
        model,
        queries,
        pool,
        k=settings.n_peers,
        min_support=settings.min_support,
        max_statements=settings.max_statements,
        num_threads=num_threads,
        query_embeddings=query_embeddings,
        pool_embeddings=pool_embeddings,
        chunk_size=chunk_size or PEER_CHUNK,
    )
    return own, peers


def signal_batches(
    model: Recommender,
    states: PatientStates,
    pool: PatientStates,
    *,
    batch_size: int = 100_000,
    k: int = 10,
    n_reasons: int = 3,
    n_peers: int = 20,
    min_support: int = 5,
    max_statements: int | None = 10,
    num_threads: int = 0,
) -> Iterator[tuple[SelfSignals, PeerSignals]]:
    """Self and peer signals for many states, ``batch_size`` states at a time.

    The pool is embedded once; each batch's frames are yielded and can be written
    out and dropped, so memory is bounded by one batch whatever ``len(states)``.
    The ``state`` columns are rows of ``states`` (not of the batch).
    """
    pool_embeddings = model.embed(pool)
    settings = SignalSettings(
        k_self=k,
        n_reasons=n_reasons,
        n_peers=n_peers,
        min_support=min_support,
        max_statements=max_statements,
    )
    for start in range(0, len(states), batch_size):
        batch = states.subset(np.arange(start, min(len(states), start + batch_size)))
        own, peers = encounter_signals(
            model,
            batch,
            pool,
            settings,
            num_threads=num_threads,
            pool_embeddings=pool_embeddings,
        )
        for frame in (own.items, own.reasons, peers.peers, peers.statements):
            frame["state"] += start
        yield own, peers


__all__ = [
    "PeerSignals",
    "SelfSignals",
    "SignalSettings",
    "encounter_signals",
    "peer_signals",
    "self_signals",
    "signal_batches",
    "top_k",
    "unit_rows",
]
