"""Self- and peer-informed signals, computed in vectorized chunks.

**Self signals**: for each state, the model's top-k next items with their scores
and, when the model can attribute its scores (:attr:`Recommender.explains`), the
features (previous-plan items, active conditions, pregnancy stage, ...) that
push each item's score most.

**Peer signals**: for each query state, the k most similar TRAIN patients in the
model's embedding space (cosine), and the items they received next.

Rules, enforced here and tested:

* a peer is another patient: every state of the query's own patient is excluded;
* nothing after the query's ``index_time`` is used: a peer state is eligible only
  if its outcome (its next encounter, whose plan is what the peer "received
  next") was recorded at or before the query's ``index_time``, i.e.
  ``peer.next_time <= query.index_time`` (hence also ``peer.index_time <`` it);
* a patient's similarity is that of her most similar eligible state, and that
  state's next plan is what she contributes (one vote per distinct patient);
* an item becomes a statement only when at least ``min_support`` distinct peers
  received it.

Usage::

    own = self_signals(model, test_states, k=10)
    peers = peer_signals(model, test_states, pool=train_states, k=20, min_support=5)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from recsys.base import Recommender, single_threaded_blas
from recsys.interactions import PatientStates
from recsys.type_aliases import FloatMatrix, IndexMatrix


def top_k(scores: FloatMatrix, k: int) -> tuple[IndexMatrix, FloatMatrix]:
    """Top-k columns of each row, best first (ties: lower column first).

    Args:
        scores: (n, n_items) float.
    Returns: indices (n, min(k, n_items)) int64 and their scores (float32).
    """
    n, v = scores.shape
    k = min(k, v)
    if k == 0:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32)
    if k < v:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(v), (n, v))
    part_scores = np.take_along_axis(scores, part, axis=1)
    # sort by score desc, then by column asc
    order = np.lexsort((part, -part_scores), axis=1)
    idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return idx, np.take_along_axis(part_scores, order, axis=1).astype(np.float32)


def unit_rows(matrix: FloatMatrix) -> FloatMatrix:
    """Rows scaled to unit L2 norm (zero rows stay zero); float32."""
    out = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return out / norms


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
    chunk_size: int = 8192,
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
            "encounter_id": _take(states.keys["encounter_id"], state),
            "patient_id": _take(states.keys["patient_id"], state),
            "rank": rank,
            "item": item,
            "item_key": _labels(vocab.items, item),
            "item_display": _labels(vocab.item_displays, item),
            "item_kind": _labels(vocab.item_kinds, item),
            "score": scores_all.ravel(),
        }
    )
    reasons = _reason_frame(states, idx_all, reason_f, reason_v)
    return SelfSignals(items, reasons)


def _take(column: pd.Series, rows: npt.NDArray[np.int64]) -> pd.Series:
    """``column`` at ``rows`` with its dtype kept (no per-row Python objects)."""
    return column.take(rows).reset_index(drop=True)


def _labels(labels: tuple[str, ...], index: npt.NDArray[np.int64]) -> pd.Categorical:
    """Categorical of ``labels[index]`` built from codes (no per-row strings)."""
    codes, uniques = pd.factorize(pd.Series(labels, dtype=object))
    return pd.Categorical.from_codes(codes[index], categories=pd.Index(uniques, dtype=object))


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
            "item_key": _labels(vocab.items, items[state, rank]),
            "reason_rank": reason.astype(np.int64) + 1,
            "feature": _labels(vocab.features, feat),
            "feature_display": _labels(vocab.feature_displays, feat),
            "contribution": v[state, rank, reason],
        }
    )


@dataclass(frozen=True)
class PeerSignals:
    """Similar training patients and what they received next.

    Attributes:
        peers: one row per (query state, peer): ``state``, ``encounter_id``,
            ``patient_id``, ``peer_rank`` (1 = most similar), ``peer_state`` (row of the
            pool), ``peer_patient_id``, ``peer_encounter_id``, ``peer_index_time``,
            ``peer_next_time``, ``similarity`` (cosine).
        statements: one row per (query state, item) supported by at least
            ``min_support`` distinct peers: ``state``, ``encounter_id``, ``patient_id``,
            ``item``, ``item_key``, ``item_display``, ``support`` (distinct peers who
            received it next), ``n_peers`` (peers found), ``share`` = support / n_peers,
            ``mean_similarity`` (of its supporters).
        min_support: the threshold used.
    """

    peers: pd.DataFrame
    statements: pd.DataFrame
    min_support: int


def peer_signals(
    model: Recommender,
    queries: PatientStates,
    pool: PatientStates,
    k: int = 20,
    min_support: int = 5,
    max_statements: int | None = 10,
    chunk_size: int = 4096,
    max_slab: int = 250_000,
    oversample: int = 8,
    num_threads: int = 0,
    query_embeddings: FloatMatrix | None = None,
    pool_embeddings: FloatMatrix | None = None,
) -> PeerSignals:
    """The k most similar eligible training patients per query state, and their next items.

    Args:
        model: a fitted recommender (its :meth:`~Recommender.embed` defines similarity).
        queries: the states to find peers for (any split).
        pool: candidate peer states with targets, normally the TRAIN split.
        k: peers per query (fewer when fewer patients are eligible).
        min_support: least number of distinct peers behind a statement.
        max_statements: keep at most this many statements per query (most supported
            first); None keeps all.
        chunk_size: most queries per block (memory ~ chunk_size × k × oversample).
        max_slab: bound on the (query, masked pool state) pairs of a block: queries are
            processed in order of their index_time, so a block's queries see nearly the
            same pool prefix and each masks only the few states of that prefix whose
            outcome came after its own index_time.
        oversample: candidates fetched per peer before collapsing states into patients.
        num_threads: threads for implicit's top-k (0 = all cores).
        query_embeddings, pool_embeddings: precomputed ``model.embed`` outputs.

    Returns: :class:`PeerSignals`.
    """
    if min_support < 1:
        raise ValueError("min_support must be at least 1")
    targets, _ = pool.require_targets()
    q_emb = unit_rows(model.embed(queries) if query_embeddings is None else query_embeddings)
    p_emb = unit_rows(model.embed(pool) if pool_embeddings is None else pool_embeddings)
    if len(q_emb) != len(queries) or len(p_emb) != len(pool):
        raise ValueError("embeddings must have one row per state")

    # pool sorted by outcome time: the eligible peers of a query are a prefix
    p_order = np.argsort(pool.keys["next_us"].to_numpy(), kind="stable")
    p_next = pool.keys["next_us"].to_numpy()[p_order]
    p_emb = np.ascontiguousarray(p_emb[p_order])
    patient_codes, patient_of_pool = np.unique(
        pool.keys["patient_id"].to_numpy()[p_order].astype(str), return_inverse=True
    )
    patient_of_pool = patient_of_pool.astype(np.int64)
    q_patient = queries.keys["patient_id"].to_numpy().astype(str)
    lookup = pd.Index(patient_codes)
    q_code = lookup.get_indexer(q_patient).astype(np.int64)  # -1: not in the pool
    cut = np.searchsorted(p_next, queries.keys["index_us"].to_numpy(), side="right")

    q_rows: list[npt.NDArray[np.int64]] = []
    q_ranks: list[npt.NDArray[np.int64]] = []
    q_peer: list[npt.NDArray[np.int64]] = []
    q_sim: list[npt.NDArray[np.float32]] = []
    # pool positions grouped by patient, as sorted keys patient * n_pool + position
    n_pool = len(p_order)
    own_keys = np.sort(patient_of_pool * n_pool + np.arange(n_pool, dtype=np.int64))
    q_order = np.argsort(cut, kind="stable")
    q_order = q_order[cut[q_order] > 0]  # no eligible peer at all: nothing to search
    for rows in _query_chunks(q_order, cut, chunk_size, max_slab):
        peers, sims = _nearest_patients(
            q_emb[rows],
            cut[rows],
            q_code[rows],
            p_emb,
            patient_of_pool,
            own_keys,
            k,
            oversample,
            num_threads,
        )
        found = peers >= 0
        r, c = np.nonzero(found)
        q_rows.append(rows[r])
        q_ranks.append(c + 1)
        q_peer.append(peers[r, c])
        q_sim.append(sims[r, c])

    state = np.concatenate(q_rows) if q_rows else np.zeros(0, dtype=np.int64)
    peer_rank = np.concatenate(q_ranks) if q_ranks else np.zeros(0, dtype=np.int64)
    peer_sorted = np.concatenate(q_peer) if q_peer else np.zeros(0, dtype=np.int64)
    similarity = np.concatenate(q_sim) if q_sim else np.zeros(0, dtype=np.float32)
    order = np.lexsort((peer_rank, state))
    state, peer_rank, similarity = state[order], peer_rank[order], similarity[order]
    peer_state = p_order[peer_sorted[order]]

    qk, pk = queries.keys, pool.keys
    peers_frame = pd.DataFrame(
        {
            "state": state,
            "encounter_id": _take(qk["encounter_id"], state),
            "patient_id": _take(qk["patient_id"], state),
            "peer_rank": peer_rank,
            "peer_state": peer_state,
            "peer_patient_id": _take(pk["patient_id"], peer_state),
            "peer_encounter_id": _take(pk["encounter_id"], peer_state),
            "peer_index_time": _take(pk["index_time"], peer_state),
            "peer_next_time": _take(pk["next_time"], peer_state),
            "similarity": similarity,
        }
    )
    statements = _statements(
        queries, targets, state, peer_state, similarity, min_support, max_statements
    )
    return PeerSignals(peers_frame, statements, min_support)


class _Exclusions:
    """Per-query pool positions to skip, in the form implicit's ``topk`` reads them.

    ``topk(..., filter_query_items=f)`` reads ``f[i].indices`` for query i; a SciPy
    CSR row lookup costs ~0.3 ms, so precomputed slices are handed over instead.
    """

    class _Row:
        __slots__ = ("indices",)

        def __init__(self, indices: npt.NDArray[np.int32]) -> None:
            self.indices = indices

    def __init__(self, indptr: npt.NDArray[np.int64], indices: npt.NDArray[np.int32]) -> None:
        self.indptr, self.indices = indptr, indices

    def __getitem__(self, row: int) -> _Exclusions._Row:
        return self._Row(self.indices[self.indptr[row] : self.indptr[row + 1]])


def _exclusions(
    cut: npt.NDArray[np.int64],
    skip_rows: npt.NDArray[np.int64],
    skip_codes: npt.NDArray[np.int64],
    own_keys: npt.NDArray[np.int64],
    n_pool: int,
    width: int,
) -> _Exclusions:
    """For each of m queries, the pool positions below ``width`` to skip: every state of
    the patients paired with it in (``skip_rows``, ``skip_codes``), and the positions
    from its cut (outcome after its index_time) up to ``width``."""
    m = len(cut)
    by_row = np.argsort(skip_rows, kind="stable")
    skip_rows, skip_codes = skip_rows[by_row], skip_codes[by_row]
    # a patient's positions are the segment of own_keys between code*n and code*n+width
    first = np.searchsorted(own_keys, skip_codes * n_pool)
    seg_len = np.searchsorted(own_keys, skip_codes * n_pool + width) - first
    late_len = width - cut
    skip_per_row = np.bincount(np.repeat(skip_rows, seg_len), minlength=m)
    indptr = np.concatenate([[0], np.cumsum(skip_per_row + late_len)]).astype(np.int64)
    cols = np.empty(int(indptr[-1]), dtype=np.int32)
    # skipped patients' states first (rows ascending), then each row's late positions
    seg_start = np.cumsum(seg_len) - seg_len
    offsets = np.arange(seg_len.sum()) - np.repeat(seg_start, seg_len)
    seg_cols = (
        own_keys[np.repeat(first, seg_len) + offsets] - np.repeat(skip_codes, seg_len) * n_pool
    )
    seg_rows = np.repeat(skip_rows, seg_len)
    row_start = np.concatenate([[0], np.cumsum(skip_per_row)])[:-1]
    within = np.arange(len(seg_rows)) - row_start[seg_rows]
    cols[indptr[seg_rows] + within] = seg_cols
    late_rows = np.repeat(np.arange(m), late_len)
    late_within = np.arange(late_len.sum()) - np.repeat(np.cumsum(late_len) - late_len, late_len)
    cols[indptr[late_rows] + skip_per_row[late_rows] + late_within] = (
        np.repeat(cut, late_len) + late_within
    )
    return _Exclusions(indptr, cols)


def _nearest_patients(
    q_emb: FloatMatrix,
    cut: npt.NDArray[np.int64],
    q_code: npt.NDArray[np.int64],
    p_emb: FloatMatrix,
    patient_of_pool: npt.NDArray[np.int64],
    own_keys: npt.NDArray[np.int64],
    k: int,
    oversample: int,
    num_threads: int,
) -> tuple[IndexMatrix, FloatMatrix]:
    """For m queries: (m, k) pool positions of the best state of each of the k most
    similar eligible patients (-1 when fewer), and the cosine similarities.

    implicit's fused top-k searches the pool prefix the block may see, skipping per
    query its own patient's states and the states whose outcome came after it; each
    patient found keeps her most similar state. A query whose ``k * oversample``
    candidates hold fewer than k patients searches again with the patients found so
    far skipped too: any patient found later is less similar than every earlier
    candidate, so the result is exact.
    """
    from implicit.cpu.topk import topk

    m = len(q_emb)
    out_peer = np.full((m, k), -1, dtype=np.int64)
    out_sim = np.zeros((m, k), dtype=np.float32)
    out_code = np.full((m, k), -1, dtype=np.int64)
    n_found = np.zeros(m, dtype=np.int64)
    todo = np.arange(m)
    fetch = k * oversample
    while len(todo):
        c = cut[todo]
        width = int(c.max())
        n_fetch = min(fetch, width)
        # skip: the query's own patient and the patients already found for it
        own_rows = np.flatnonzero(q_code[todo] >= 0)
        found_rows, found_slot = np.nonzero(out_code[todo] >= 0)
        skip_rows = np.concatenate([own_rows, found_rows])
        skip_codes = np.concatenate(
            [q_code[todo][own_rows], out_code[todo[found_rows], found_slot]]
        )
        excluded = _exclusions(c, skip_rows, skip_codes, own_keys, len(patient_of_pool), width)
        with single_threaded_blas():
            ids, sims = topk(
                p_emb[:width], q_emb[todo], n_fetch, filter_query_items=excluded,
                num_threads=num_threads,
            )  # fmt: skip
        ids = np.asarray(ids, dtype=np.int64)
        sims = np.asarray(sims, dtype=np.float32)
        valid = sims > np.float32(-1e30)
        # order by similarity (near-ties, float noise, to the earlier pool state), then
        # keep each patient's first state
        with np.errstate(over="ignore"):  # rounding the -inf fillers of skipped states
            key = np.where(valid, np.round(sims, 6), -np.inf)
        order = np.lexsort((ids, -key), axis=-1)
        ids, sims, valid = (np.take_along_axis(a, order, axis=1) for a in (ids, sims, valid))
        patients = np.where(valid, patient_of_pool[ids], -1)
        by_patient = np.argsort(patients, axis=1, kind="stable")
        sorted_patients = np.take_along_axis(patients, by_patient, axis=1)
        repeat = np.zeros_like(valid)
        repeat[:, 1:] = sorted_patients[:, 1:] == sorted_patients[:, :-1]
        duplicate = np.empty_like(valid)
        np.put_along_axis(duplicate, by_patient, repeat, axis=1)
        keep = valid & ~duplicate
        slot = n_found[todo][:, None] + np.cumsum(keep, axis=1) - 1
        take = keep & (slot < k)
        r, col = np.nonzero(take)
        rows, slots = todo[r], slot[r, col]
        out_peer[rows, slots] = ids[r, col]
        out_sim[rows, slots] = sims[r, col]
        out_code[rows, slots] = patients[r, col]
        n_found[todo] += take.sum(axis=1)
        # more to find only where every fetched candidate was eligible
        need_more = (n_found[todo] < k) & (valid.sum(axis=1) == n_fetch)
        todo = todo[need_more]
    return out_peer, out_sim


def _query_chunks(
    q_order: npt.NDArray[np.int64],
    cut: npt.NDArray[np.int64],
    chunk_size: int,
    max_slab: int,
) -> list[npt.NDArray[np.int64]]:
    """Split queries (sorted by cut) into blocks of at most ``chunk_size`` queries whose
    masked pairs Σ (block's largest cut - cut) stay under ``max_slab`` (one query at least)."""
    sorted_cut = cut[q_order].astype(np.int64)
    prefix = np.concatenate([[0], np.cumsum(sorted_cut)])
    chunks = []
    i, n = 0, len(q_order)
    while i < n:
        hi = min(n, i + chunk_size)
        # slab(i, j) = (j - i + 1) * cut[j] - Σ cut[i..j] grows with j: binary search
        lo_j, hi_j = i, hi - 1
        while lo_j < hi_j:
            mid = (lo_j + hi_j + 1) // 2
            slab = (mid - i + 1) * sorted_cut[mid] - (prefix[mid + 1] - prefix[i])
            if slab <= max_slab:
                lo_j = mid
            else:
                hi_j = mid - 1
        chunks.append(q_order[i : lo_j + 1])
        i = lo_j + 1
    return chunks


def _statements(
    queries: PatientStates,
    targets: sp.csr_matrix,
    state: npt.NDArray[np.int64],
    peer_state: npt.NDArray[np.int64],
    similarity: npt.NDArray[np.float32],
    min_support: int,
    max_statements: int | None,
) -> pd.DataFrame:
    n_q, n_pool = len(queries), targets.shape[0]
    vocab = queries.vocab
    chosen = sp.csr_matrix(
        (np.ones(len(state), dtype=np.float32), (state, peer_state)), shape=(n_q, n_pool)
    )
    weighted = sp.csr_matrix((similarity, (state, peer_state)), shape=(n_q, n_pool))
    binary = targets.astype(np.float32).tocsr()
    binary.data[:] = 1.0
    support = (chosen @ binary).tocoo()
    sim_sum = (weighted @ binary).tocsr()
    keep = support.data >= min_support
    row, col, count = support.row[keep], support.col[keep], support.data[keep]
    n_peers = np.bincount(state, minlength=n_q)
    mean_sim = np.asarray(sim_sum[row, col]).ravel() / count
    frame = pd.DataFrame(
        {
            "state": row.astype(np.int64),
            "item": col.astype(np.int64),
            "support": np.rint(count).astype(np.int64),
            "mean_similarity": mean_sim.astype(np.float32),
        }
    )
    frame["n_peers"] = n_peers[frame["state"].to_numpy()]
    frame["share"] = frame["support"] / frame["n_peers"]
    frame = frame.sort_values(
        ["state", "support", "mean_similarity", "item"], ascending=[True, False, False, True]
    )
    if max_statements is not None:
        frame = frame.groupby("state", sort=False).head(max_statements)
    frame = frame.reset_index(drop=True)
    item = frame["item"].to_numpy()
    s = frame["state"].to_numpy()
    frame.insert(1, "encounter_id", _take(queries.keys["encounter_id"], s))
    frame.insert(2, "patient_id", _take(queries.keys["patient_id"], s))
    frame.insert(4, "item_key", _labels(vocab.items, item))
    frame.insert(5, "item_display", _labels(vocab.item_displays, item))
    return frame[
        [
            "state",
            "encounter_id",
            "patient_id",
            "item",
            "item_key",
            "item_display",
            "support",
            "n_peers",
            "share",
            "mean_similarity",
        ]
    ]


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
    for start in range(0, len(states), batch_size):
        batch = states.subset(np.arange(start, min(len(states), start + batch_size)))
        own = self_signals(model, batch, k=k, n_reasons=n_reasons)
        peers = peer_signals(
            model,
            batch,
            pool,
            k=n_peers,
            min_support=min_support,
            max_statements=max_statements,
            num_threads=num_threads,
            pool_embeddings=pool_embeddings,
        )
        for frame in (own.items, own.reasons, peers.peers, peers.statements):
            frame["state"] += start
        yield own, peers
