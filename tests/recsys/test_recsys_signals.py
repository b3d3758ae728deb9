"""Self and peer signals: top-k, reasons, and the peer rules (never herself, nothing after
the index time, no statement with fewer than m supporters)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys.base import Recommender, make_recommender
from recsys.interactions import PatientStates
from recsys.signals import peer_signals, self_signals, top_k, unit_rows


@pytest.fixture(scope="module")
def model(train: PatientStates, fast_params: dict[str, dict[str, object]]) -> Recommender:
    return make_recommender("lightfm", **fast_params["lightfm"]).fit(train)


def test_top_k_orders_by_score_then_lower_index() -> None:
    scores = np.array([[0.1, 0.5, 0.5, 0.9, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    idx, values = top_k(scores, 3)
    assert idx.tolist() == [[3, 1, 2], [0, 1, 2]]
    assert values.tolist() == [[pytest.approx(0.9), 0.5, 0.5], [1.0, 1.0, 1.0]]
    idx, _ = top_k(scores, 10)
    assert idx.shape == (2, 5)


def test_self_signals_list_the_models_top_items_with_reasons(
    model: Recommender, unseen: PatientStates
) -> None:
    signals = self_signals(model, unseen, k=5, n_reasons=2, chunk_size=64)
    items = signals.items
    assert len(items) == 5 * len(unseen)
    expected, _ = top_k(model.score(unseen), 5)
    assert np.array_equal(items["item"].to_numpy().reshape(-1, 5), expected)
    assert (items.groupby("state")["score"].diff().dropna() <= 0).all()
    assert list(items["item_key"].iloc[:5]) == [unseen.vocab.items[i] for i in expected[0]]
    reasons = signals.reasons
    assert len(reasons) > 0
    assert (reasons["contribution"] > 0).all()
    assert reasons["reason_rank"].max() <= 2
    index = unseen.vocab.feature_index()
    for row in reasons.sample(50, random_state=0).itertuples(index=False):
        assert unseen.features[row.state, index[row.feature]] != 0
        assert (
            items.loc[
                (items["state"] == row.state) & (items["rank"] == row.rank), "item_key"
            ].item()
            == row.item_key
        )


def test_self_signals_do_not_depend_on_chunking(model: Recommender, unseen: PatientStates) -> None:
    a = self_signals(model, unseen, k=4, chunk_size=7)
    b = self_signals(model, unseen, k=4, chunk_size=10_000)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.reasons, b.reasons)


@pytest.fixture(scope="module")
def train_peers(model: Recommender, train: PatientStates) -> pd.DataFrame:
    """Peers of TRAIN states among train states: the pool holds the query's own patient."""
    return peer_signals(model, train, train, k=5, min_support=2).peers


def test_a_patient_is_never_her_own_peer(train_peers: pd.DataFrame) -> None:
    assert len(train_peers) > 0
    assert (train_peers["peer_patient_id"] != train_peers["patient_id"]).all()


def test_peers_use_nothing_after_the_index_time(
    train_peers: pd.DataFrame, train: PatientStates
) -> None:
    query_time = train.keys["index_time"].to_numpy()[train_peers["state"].to_numpy()]
    assert (train_peers["peer_next_time"].to_numpy() <= query_time).all()
    assert (train_peers["peer_index_time"].to_numpy() < query_time).all()


def test_peers_are_distinct_patients_ranked_by_similarity(train_peers: pd.DataFrame) -> None:
    per_query = train_peers.groupby("state")
    assert (per_query["peer_patient_id"].nunique() == per_query.size()).all()
    assert (per_query.size() <= 5).all()
    # descending (near-ties within 1e-6 are ordered by pool position)
    assert (per_query["similarity"].diff().dropna() <= 1e-5).all()


def test_peers_match_a_brute_force_search(
    model: Recommender, train: PatientStates, unseen: PatientStates
) -> None:
    found = peer_signals(model, unseen, train, k=4, min_support=1, chunk_size=13, max_slab=500)
    q, p = unit_rows(model.embed(unseen)), unit_rows(model.embed(train))
    sim = q @ p.T
    eligible = (
        train.keys["next_us"].to_numpy()[None, :] <= unseen.keys["index_us"].to_numpy()[:, None]
    )
    eligible &= (
        train.keys["patient_id"].to_numpy()[None, :]
        != unseen.keys["patient_id"].to_numpy()[:, None]
    )
    checked = 0
    for row in range(len(unseen)):
        frame = pd.DataFrame({"patient": train.keys["patient_id"], "sim": sim[row]})[eligible[row]]
        ranked = frame.groupby("patient")["sim"].max().sort_values(ascending=False)
        best = ranked.head(4)
        got = found.peers[found.peers["state"] == row]
        np.testing.assert_allclose(got["similarity"].to_numpy(), best.to_numpy(), atol=1e-5)
        # the same patients, unless the 4th and 5th best are tied
        tied = len(ranked) > 4 and np.isclose(ranked.iloc[3], ranked.iloc[4], atol=1e-5)
        assert set(got["peer_patient_id"]) == set(best.index) or tied
        checked += len(got)
    assert checked > 0


def test_statements_need_min_support_distinct_peers(
    model: Recommender, train: PatientStates, unseen: PatientStates
) -> None:
    m = 3
    signals = peer_signals(model, unseen, train, k=6, min_support=m, max_statements=None)
    statements, peers = signals.statements, signals.peers
    assert len(statements) > 0
    assert (statements["support"] >= m).all()
    # recount from the peers and their next plans: exactly the items with >= m supporters
    targets, _ = train.require_targets()
    rows = [
        (state, item, patient)
        for state, peer_state, patient in peers[
            ["state", "peer_state", "peer_patient_id"]
        ].itertuples(index=False)
        for item in targets[peer_state].indices
    ]
    recount = (
        pd.DataFrame(rows, columns=["state", "item", "patient"])
        .groupby(["state", "item"])["patient"]
        .nunique()
    )
    expected = recount[recount >= m].sort_index()
    got = statements.set_index(["state", "item"])["support"].sort_index()
    assert got.index.equals(expected.index)
    assert (got.to_numpy() == expected.to_numpy()).all()
    assert (statements["share"] == statements["support"] / statements["n_peers"]).all()


def test_no_statement_when_fewer_peers_than_min_support(
    model: Recommender, train: PatientStates, unseen: PatientStates
) -> None:
    signals = peer_signals(model, unseen, train, k=3, min_support=4)
    assert len(signals.peers) > 0
    assert signals.statements.empty


def test_the_most_similar_states_are_skipped_when_ineligible(
    train: PatientStates, unseen: PatientStates, model: Recommender
) -> None:
    """Adversarial embeddings: the query's own states and states whose outcome came after
    its index time are made identical to it; they must still never be chosen."""
    query = unseen.subset([len(unseen) - 1])
    pool = train
    q_time = query.keys["index_us"].iloc[0]
    rng = np.random.default_rng(0)
    q_emb = np.ones((1, 6), dtype=np.float32)
    p_emb = rng.normal(size=(len(pool), 6)).astype(np.float32)
    late = pool.keys["next_us"].to_numpy() > q_time
    assert late.any() and (~late).sum() >= 3
    p_emb[late] = 1.0  # perfect matches, but their outcome is in the query's future
    # and make the query's patient part of the pool with perfect matches too
    own = pool.subset(np.flatnonzero(~late)[:3])
    own_keys = own.keys.assign(patient_id=query.keys["patient_id"].iloc[0])
    mixed_keys = pd.concat([pool.keys, own_keys], ignore_index=True)
    import scipy.sparse as sp

    mixed = PatientStates(
        mixed_keys,
        sp.vstack([pool.features, own.features], format="csr"),
        sp.vstack([pool.history, own.history], format="csr"),
        sp.vstack([pool.last_plan, own.last_plan], format="csr"),
        sp.vstack([pool.targets, own.targets], format="csr"),
        np.concatenate([pool.n_true, own.n_true]),
        pool.vocab,
    )
    p_all = np.vstack([p_emb, np.ones((3, 6), dtype=np.float32)])
    found = peer_signals(
        model, query, mixed, k=3, min_support=1, query_embeddings=q_emb, pool_embeddings=p_all
    ).peers
    assert len(found) == 3
    assert (found["similarity"] < 0.999).all()
    assert (found["peer_patient_id"] != query.keys["patient_id"].iloc[0]).all()
    assert (found["peer_state"] < len(pool)).all()
    assert not late[found["peer_state"].to_numpy()].any()


def test_a_query_before_any_outcome_gets_no_peers(model: Recommender, train: PatientStates) -> None:
    first = int(np.argmin(train.keys["index_us"].to_numpy()))
    query = train.subset([first])
    signals = peer_signals(model, query, train, k=5, min_support=1)
    assert signals.peers.empty and signals.statements.empty


def test_peer_signals_do_not_depend_on_chunking(
    model: Recommender, train: PatientStates, unseen: PatientStates
) -> None:
    a = peer_signals(model, unseen, train, k=5, min_support=2, chunk_size=5, max_slab=50)
    b = peer_signals(model, unseen, train, k=5, min_support=2)
    pd.testing.assert_frame_equal(
        a.peers.drop(columns=["similarity"]), b.peers.drop(columns=["similarity"])
    )
    np.testing.assert_allclose(a.peers["similarity"], b.peers["similarity"], atol=1e-6)
    pd.testing.assert_frame_equal(a.statements, b.statements, atol=1e-6)


def test_signal_batches_equal_one_big_batch(
    model: Recommender, train: PatientStates, unseen: PatientStates
) -> None:
    from recsys.signals import signal_batches

    parts = list(signal_batches(model, unseen, train, batch_size=40, k=3, n_peers=4, min_support=2))
    assert len(parts) == -(-len(unseen) // 40)
    items = pd.concat([own.items for own, _ in parts], ignore_index=True)
    peers = pd.concat([p.peers for _, p in parts], ignore_index=True)
    whole_items = self_signals(model, unseen, k=3).items
    whole_peers = peer_signals(model, unseen, train, k=4, min_support=2).peers
    pd.testing.assert_frame_equal(items, whole_items, check_categorical=False)
    pd.testing.assert_frame_equal(
        peers.drop(columns="similarity"), whole_peers.drop(columns="similarity")
    )


def reference_peer_signals(
    queries: PatientStates,
    pool: PatientStates,
    q_emb: np.ndarray,
    p_emb: np.ndarray,
    k: int,
    min_support: int,
    max_statements: int | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The peer rules written out one query at a time, for comparison with the vectorized
    search: eligible states (outcome at or before the index time, another patient), each
    patient's best state (similarity to 6 decimals, then the earlier outcome), the k best
    patients, then each item with its distinct supporters."""
    q, p = unit_rows(q_emb), unit_rows(p_emb)
    sims = q @ p.T
    targets, _ = pool.require_targets()
    next_us = pool.keys["next_us"].to_numpy()
    # the earlier outcome first; among equal outcome times, the earlier pool row
    position = np.empty(len(pool), dtype=np.int64)
    position[np.argsort(next_us, kind="stable")] = np.arange(len(pool))
    pool_patients = pool.keys["patient_id"].to_numpy()
    peer_rows, statement_rows = [], []
    for state in range(len(queries)):
        own = queries.keys["patient_id"].iloc[state]
        index_us = queries.keys["index_us"].iloc[state]
        best: dict[str, tuple[float, int, int]] = {}  # patient -> (-key, position, row)
        for row in range(len(pool)):
            if next_us[row] > index_us or pool_patients[row] == own:
                continue
            candidate = (-float(np.round(sims[state, row], 6)), int(position[row]), row)
            if pool_patients[row] not in best or candidate < best[pool_patients[row]]:
                best[pool_patients[row]] = candidate
        chosen = sorted(best.values())[:k]
        support: dict[int, list[float]] = {}
        for rank, (_, _, row) in enumerate(chosen, start=1):
            peer_rows.append((state, rank, row, float(sims[state, row])))
            for item in targets[row].indices:
                support.setdefault(int(item), []).append(float(sims[state, row]))
        kept = [
            (state, item, len(s), len(chosen), np.mean(s))
            for item, s in support.items()
            if len(s) >= min_support
        ]
        kept.sort(key=lambda t: (-t[2], -t[4], t[1]))
        statement_rows.extend(kept if max_statements is None else kept[:max_statements])
    peers = pd.DataFrame(peer_rows, columns=["state", "peer_rank", "peer_state", "similarity"])
    statements = pd.DataFrame(
        statement_rows, columns=["state", "item", "support", "n_peers", "mean_similarity"]
    )
    return peers, statements


@pytest.mark.parametrize(
    ("settings", "embeddings", "max_statements"),
    [
        ({}, "model", None),
        ({}, "model", 3),
        ({"chunk_size": 7, "max_slab": 40, "sample_states": 6, "num_threads": 2}, "model", 3),
        ({"sample_states": 10_000, "num_threads": 1}, "model", None),
        # coarse embeddings: many exact ties (and all-zero rows), broken by outcome time;
        # all statements kept, as exactly tied means may round apart in float32
        ({}, "coarse", None),
        ({"chunk_size": 5, "sample_states": 6, "num_threads": 2}, "coarse", None),
    ],
)
def test_peer_search_equals_a_reference_implementation(
    model: Recommender,
    train: PatientStates,
    unseen: PatientStates,
    settings: dict[str, int],
    embeddings: str,
    max_statements: int | None,
) -> None:
    """Regression guard of the vectorized peer search (issue 3: 100k states in 30 s): the
    same peers in the same order and the same statements as the rules written plainly."""
    q_emb, p_emb = model.embed(unseen), model.embed(train)
    if embeddings == "coarse":
        q_emb, p_emb = ((np.round(e * 2) / 2).astype(np.float32) for e in (q_emb, p_emb))
    k, m = 5, 2
    found = peer_signals(
        model,
        unseen,
        train,
        k=k,
        min_support=m,
        max_statements=max_statements,
        query_embeddings=q_emb,
        pool_embeddings=p_emb,
        **settings,
    )
    peers, statements = reference_peer_signals(unseen, train, q_emb, p_emb, k, m, max_statements)
    assert len(peers) > 0 and len(statements) > 0
    got = found.peers[["state", "peer_rank", "peer_state"]]
    pd.testing.assert_frame_equal(got, peers[["state", "peer_rank", "peer_state"]])
    np.testing.assert_allclose(found.peers["similarity"], peers["similarity"], atol=1e-6)
    # the same statements; their order within a query is _statements' (mean similarity)
    got_statements = found.statements.sort_values(["state", "item"], ignore_index=True)
    statements = statements.sort_values(["state", "item"], ignore_index=True)
    columns = ["state", "item", "support", "n_peers"]
    pd.testing.assert_frame_equal(got_statements[columns], statements[columns])
    np.testing.assert_allclose(
        got_statements["mean_similarity"], statements["mean_similarity"], atol=1e-6
    )


def test_entries_at_least_a_floor_are_all_found() -> None:
    from recsys.peers import _at_least

    rng = np.random.default_rng(3)
    for n_rows, n_cols in [(1, 1), (3, 63), (5, 64), (7, 130), (64, 512)]:
        scores = rng.normal(size=(n_rows, n_cols)).astype(np.float32)
        floor = rng.normal(loc=1.5, size=(n_rows, 1)).astype(np.float32)
        row, col, value = _at_least(scores, floor, offset=100)
        expected_row, expected_col = np.nonzero(scores >= floor)
        order = np.lexsort((col, row))
        assert np.array_equal(row[order], expected_row)
        assert np.array_equal(col[order], expected_col + 100)
        assert np.array_equal(value[order], scores[expected_row, expected_col])
