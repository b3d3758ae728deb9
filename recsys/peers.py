"""Peer-informed signals: the most similar TRAIN patients and what they received next.

For each query state, the k most similar TRAIN patients in the model's embedding
space (cosine), and the items they received next. The search is exact: every
eligible (query, pool state) pair is scored by float32 matrix products in
cache-sized tiles, and only the states above a per-query floor (a lower bound of
the k-th best patient's similarity, taken from a sample of the pool) are kept and
sorted; blocks of queries run on all cores.

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

`peers_may_change` is the other side of these rules: which stored queries a
change of the pool can affect (the prompt table's incremental refresh uses it).

Usage::

    peers = peer_signals(model, test_states, pool=train_states, k=20, min_support=5)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from recsys.base import Recommender, single_threaded_blas
from recsys.interactions import PatientStates
from recsys.ranking import coded_labels, take_rows, unit_rows
from recsys.type_aliases import FloatMatrix, FloatVector, IndexMatrix


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
    sample_states: int = 8192,
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
        chunk_size: most queries per block.
        max_slab: bound on the (query, masked pool state) pairs of a block: queries are
            processed in order of their index_time, so a block's queries see nearly the
            same pool prefix and each masks only the few states of that prefix whose
            outcome came after its own index_time.
        sample_states: pool states (per block) whose similarities set each query's
            threshold for candidates; only the speed depends on it, never the result.
        num_threads: blocks searched at once (0 = one per available core).
        query_embeddings, pool_embeddings: precomputed ``model.embed`` outputs.

    Similarities are float32 cosines; two states whose cosines agree to 6 decimals
    are tied, and ties go to the state whose outcome was recorded first.

    Returns: :class:`PeerSignals`.
    """
    if min_support < 1:
        raise ValueError("min_support must be at least 1")
    if k < 1:
        raise ValueError("k must be at least 1")
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
    search = _PoolSearch(p_emb, patient_of_pool.astype(np.int64), k, sample_states)
    q_patient = queries.keys["patient_id"].to_numpy().astype(str)
    q_code = pd.Index(patient_codes).get_indexer(q_patient).astype(np.int64)  # -1: not in pool
    cut = np.searchsorted(p_next, queries.keys["index_us"].to_numpy(), side="right")
    q_order = np.argsort(cut, kind="stable")
    q_order = q_order[cut[q_order] > 0]  # no eligible peer at all: nothing to search
    blocks = _query_chunks(q_order, cut, chunk_size, max_slab)

    def nearest(rows: npt.NDArray[np.int64]) -> tuple[IndexMatrix, FloatMatrix]:
        return search.nearest_patients(q_emb[rows], cut[rows], q_code[rows])

    workers = num_threads or _available_cores()
    with single_threaded_blas():
        if workers > 1 and len(blocks) > 1:
            # BLAS and the numpy kernels below release the GIL: blocks run side by side
            with ThreadPoolExecutor(max_workers=workers) as executor:
                found = list(executor.map(nearest, blocks))
        else:
            found = [nearest(rows) for rows in blocks]

    q_rows: list[npt.NDArray[np.int64]] = []
    q_ranks: list[npt.NDArray[np.int64]] = []
    q_peer: list[npt.NDArray[np.int64]] = []
    q_sim: list[npt.NDArray[np.float32]] = []
    for rows, (peers, sims) in zip(blocks, found, strict=True):
        r, c = np.nonzero(peers >= 0)
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
            "encounter_id": take_rows(qk["encounter_id"], state),
            "patient_id": take_rows(qk["patient_id"], state),
            "peer_rank": peer_rank,
            "peer_state": peer_state,
            "peer_patient_id": take_rows(pk["patient_id"], peer_state),
            "peer_encounter_id": take_rows(pk["encounter_id"], peer_state),
            "peer_index_time": take_rows(pk["index_time"], peer_state),
            "peer_next_time": take_rows(pk["next_time"], peer_state),
            "similarity": similarity,
        }
    )
    statements = _statements(
        queries, targets, state, peer_state, similarity, min_support, max_statements
    )
    return PeerSignals(peers_frame, statements, min_support)


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


#: Queries × pool states scored at once (a 2 MB float32 tile stays in cache).
_ROW_TILE = 1024
_COL_TILE = 512  # a multiple of 64: candidates are found 64 entries at a time
#: Similarities are compared at this precision: closer values are ties.
_DECIMALS = 6
_SCALE = np.float32(10.0**_DECIMALS)


def _rounded(sims: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Similarities rounded to ``_DECIMALS``, as integers (``np.round``'s own steps)."""
    return np.rint(sims * _SCALE).astype(np.int64)


@dataclass(frozen=True)
class _Sample:
    """Pool states that every query of a block may see, one row per sampled patient
    (her states repeated when she has fewer than the row holds); ``slot[code]`` is the
    row of the patient coded ``code``, -1 when she is not in the sample (or code is -1)."""

    positions: npt.NDArray[np.int64]  # (sampled patients, states per patient)
    slot: npt.NDArray[np.int64]  # (n_patients + 1,)


class _PoolSearch:
    """Exact search of the k most similar eligible patients, for blocks of queries.

    ``p_emb``: unit rows of the pool, sorted by outcome time; ``patient_of_pool``: each
    position's patient code (0 .. n_patients - 1).
    """

    def __init__(
        self,
        p_emb: FloatMatrix,
        patient_of_pool: npt.NDArray[np.int64],
        k: int,
        sample_states: int,
    ) -> None:
        self.p_emb = p_emb
        self.patient_of_pool = patient_of_pool
        self.k = k
        self.sample_states = max(sample_states, k)
        n_pool = len(patient_of_pool)
        self.n_patients = int(patient_of_pool.max()) + 1 if n_pool else 0
        # positions grouped by patient, ascending within each: sorted keys patient * n + position
        self._by_patient = np.sort(patient_of_pool * n_pool + np.arange(n_pool, dtype=np.int64))
        self._first = np.searchsorted(
            self._by_patient, np.arange(self.n_patients, dtype=np.int64) * n_pool
        )

    def nearest_patients(
        self, q_emb: FloatMatrix, cut: npt.NDArray[np.int64], q_code: npt.NDArray[np.int64]
    ) -> tuple[IndexMatrix, FloatMatrix]:
        """For m queries (unit rows; eligible pool prefix ``[0, cut)``; own patient code or
        -1): (m, k) pool positions of the best state of each of the k most similar
        eligible patients (-1 when fewer), and their cosine similarities.

        A patient's similarity is that of her best state. Patients, and a patient's
        states, are ordered by similarity rounded to ``_DECIMALS``, then by pool
        position (the earlier outcome first). Every eligible pair is scored, but only
        the states at or above a per-query floor are kept: the k-th best patient
        similarity within a sample of states that every query of the block may see
        (the query's own patient left out) cannot exceed the true k-th best, so no
        peer is missed.
        """
        m = len(q_emb)
        out_peer = np.full((m, self.k), -1, dtype=np.int64)
        out_sim = np.zeros((m, self.k), dtype=np.float32)
        sample = self._sample(int(cut.min()))
        width = int(cut.max())
        for r0 in range(0, m, _ROW_TILE):
            tile = slice(r0, r0 + _ROW_TILE)
            q, q_cut, code = q_emb[tile], cut[tile], q_code[tile]
            floor = self._floors(q, code, sample)[:, None]
            found = [
                _at_least(q @ self.p_emb[c0 : c0 + _COL_TILE].T, floor, c0)
                for c0 in range(0, width, _COL_TILE)
            ]
            row = np.concatenate([f[0] for f in found])
            col = np.concatenate([f[1] for f in found])
            sim = np.concatenate([f[2] for f in found])
            keep = col < q_cut[row]
            row, col, sim = row[keep], col[keep], sim[keep]
            patient = self.patient_of_pool[col]
            keep = patient != code[row]
            row, col, sim, patient = row[keep], col[keep], sim[keep], patient[keep]
            row, col, sim = self._best_patients(row, col, sim, patient)
            rank = np.arange(len(row)) - np.searchsorted(row, row)
            top = rank < self.k
            out_peer[r0 + row[top], rank[top]] = col[top]
            out_sim[r0 + row[top], rank[top]] = sim[top]
        return out_peer, out_sim

    def _best_patients(
        self,
        row: npt.NDArray[np.int64],
        col: npt.NDArray[np.int64],
        sim: npt.NDArray[np.float32],
        patient: npt.NDArray[np.int64],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Candidates (query row < _ROW_TILE, pool position, similarity, patient) reduced to
        each patient's best state, sorted by query row then best first."""
        n_pool = len(self.p_emb)
        # rank within a query: higher rounded similarity first, then the earlier position;
        # rounded similarities lie within ±(10^d + 100) for unit vectors
        span = 4 * 10**_DECIMALS * n_pool
        order = np.argsort(row * span + (2 * 10**_DECIMALS - _rounded(sim)) * n_pool + col)
        row, col, sim, patient = row[order], col[order], sim[order], patient[order]
        # each patient's best state is her first, in that order
        _, first = np.unique(row * self.n_patients + patient, return_index=True)
        first.sort()
        return row[first], col[first], sim[first]

    def _sample(self, prefix: int) -> _Sample:
        """About ``sample_states`` states below ``prefix``, spread evenly over its patients
        (at most that many patients) and over each patient's states."""
        n_pool = len(self.p_emb)
        counts = (
            np.searchsorted(
                self._by_patient, np.arange(self.n_patients, dtype=np.int64) * n_pool + prefix
            )
            - self._first
        )
        patients = np.flatnonzero(counts > 0)
        if len(patients) > self.sample_states:
            spread = np.linspace(0, len(patients) - 1, self.sample_states).astype(np.int64)
            patients = patients[spread]
        per_patient = max(1, self.sample_states // max(1, len(patients)))
        picks = (np.arange(per_patient)[None, :] * counts[patients][:, None]) // per_patient
        positions = self._by_patient[self._first[patients][:, None] + picks] % n_pool
        slot = np.full(self.n_patients + 1, -1, dtype=np.int64)  # the last: code -1
        slot[patients] = np.arange(len(patients))
        return _Sample(positions, slot)

    def _floors(
        self, q_emb: FloatMatrix, q_code: npt.NDArray[np.int64], sample: _Sample
    ) -> FloatVector:
        """Per query, a similarity below which no state is the best state of one of its k
        most similar patients (-inf when the sample holds fewer than k other patients)."""
        n_sampled, per_patient = sample.positions.shape
        m = len(q_emb)
        if n_sampled - 1 < self.k:
            return np.full(m, -np.inf, dtype=np.float32)
        sims = self.p_emb[sample.positions.ravel()] @ q_emb.T
        best = sims.reshape(n_sampled, per_patient, m).max(axis=1)  # (patients, queries)
        own = sample.slot[q_code]
        has_own = np.flatnonzero(own >= 0)
        best[own[has_own], has_own] = -np.inf
        kth = np.partition(best.T, n_sampled - self.k, axis=1)[:, n_sampled - self.k]
        # the k-th best rounds to K: a state that rounds to K or more is above (K - 2) / 10^d
        return ((_rounded(kth) - 2) / _SCALE).astype(np.float32)


def _at_least(
    scores: FloatMatrix, floor: FloatMatrix, offset: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Rows, columns (+ ``offset``) and values of the entries of ``scores`` >= ``floor``.

    Few entries pass, so they are found the way a bitmap index is read: the comparison
    is packed into bits, 64-bit words that hold a hit are found first, then their bytes
    that hold one, then the bits. ``np.nonzero`` over the boolean matrix itself would
    cost more than computing the scores.
    """
    n_rows, n_cols = scores.shape
    padded = -(-n_cols // 64) * 64
    hit = np.zeros((n_rows, padded), dtype=bool)
    np.greater_equal(scores, floor, out=hit[:, :n_cols])
    packed = np.packbits(hit, axis=1).reshape(n_rows, -1, 8)  # first column in the top bit
    word_row, word = np.nonzero(packed.view(np.uint64)[:, :, 0])
    at, byte = np.nonzero(packed[word_row, word])
    bits = np.unpackbits(packed[word_row[at], word[at], byte][:, None], axis=1)
    at_byte, bit = np.nonzero(bits)
    row = word_row[at[at_byte]].astype(np.int64)
    col = (word[at[at_byte]] * 64 + byte[at_byte] * 8 + bit).astype(np.int64)
    return row, col + offset, scores[row, col]


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
    frame.insert(1, "encounter_id", take_rows(queries.keys["encounter_id"], s))
    frame.insert(2, "patient_id", take_rows(queries.keys["patient_id"], s))
    frame.insert(4, "item_key", coded_labels(vocab.items, item))
    frame.insert(5, "item_display", coded_labels(vocab.item_displays, item))
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


#: A pool state whose similarity to a query is this close below the query's k-th peer may
#: still be among its peers: similarities are compared at ``_DECIMALS`` decimals, so a
#: float32 cosine within one unit of the 5th decimal can round to a tie.
PEER_SIMILARITY_MARGIN = 10.0 ** -(_DECIMALS - 1)


def peers_may_change(
    query_embeddings: FloatMatrix,
    query_patients: npt.NDArray[np.str_] | npt.NDArray[np.object_],
    query_index_us: npt.NDArray[np.int64],
    kth_similarity: FloatVector,
    short: npt.NDArray[np.bool_],
    changed_embeddings: FloatMatrix,
    changed_patients: npt.NDArray[np.str_] | npt.NDArray[np.object_],
    changed_next_us: npt.NDArray[np.int64],
) -> npt.NDArray[np.bool_]:
    """Which queries a changed or new TRAIN pool state may give a new peer (one bool per query).

    A changed state can enter a query's peers (or raise the similarity of one) only
    when it is eligible for the query (another patient, outcome recorded by her
    index time) and at least as similar as her k-th peer (``kth_similarity``, NaN
    when none), or when she has fewer than k peers (``short``). The query's other
    peers' states are unchanged, so nothing else can move (`peer_signals`' rules).
    """
    if not len(changed_embeddings) or not len(query_embeddings):
        return np.zeros(len(query_embeddings), dtype=bool)
    sims = unit_rows(query_embeddings) @ unit_rows(changed_embeddings).T
    eligible = (changed_next_us[None, :] <= query_index_us[:, None]) & (
        changed_patients[None, :] != query_patients[:, None]
    )
    kth = np.asarray(kth_similarity, dtype=np.float64)
    kth = np.where(np.isnan(kth), -np.inf, kth)
    close = sims >= (kth - PEER_SIMILARITY_MARGIN)[:, None]
    return np.asarray((eligible & (close | short[:, None])).any(axis=1), dtype=bool)
