"""Fragments and prompt assembly: determinism, budget, provenance, no identifiers."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from pipelines.index import ContextStore
from promptenv.fragments import PatientSignals, PeerItem, SignalItem, patient_signals_by_encounter
from promptenv.prompts import (
    INITIAL_CONFIG,
    METHODS,
    QUESTION,
    assemble,
    count_tokens,
    method_prompt,
)

SIGNALS = PatientSignals(
    model="test",
    self_items=tuple(
        SignalItem(
            f"k{i}", f"item number {i} (procedure)", 1.0 - i / 20, (f"previous plan: thing {i}",)
        )
        for i in range(15)
    ),
    peer_items=tuple(
        PeerItem(f"p{i}", f"peer item {i} (procedure)", 12 - i, 20) for i in range(10)
    ),
    n_peers=20,
    min_support=5,
)


@pytest.fixture(scope="module")
def sample(default_tables: dict[str, pd.DataFrame]) -> tuple[ContextStore, list[str]]:
    idx = default_tables["index_encounters"]
    picked = pd.concat(
        [idx[idx["is_obstetric"]].sample(15, random_state=3), idx.sample(15, random_state=4)]
    )
    ids = list(picked["encounter_id"])
    return ContextStore(default_tables, only_encounters=ids), ids


def test_rendering_is_deterministic(sample: tuple[ContextStore, list[str]]) -> None:
    store, ids = sample
    for eid in ids[:10]:
        a = assemble(store.context(eid), SIGNALS, INITIAL_CONFIG)
        b = assemble(
            ContextStore({**_tables(store)}, only_encounters=[eid]).context(eid),
            SIGNALS,
            INITIAL_CONFIG,
        )
        assert a.system == b.system and a.provenance == b.provenance


def _tables(store: ContextStore) -> dict[str, pd.DataFrame]:
    """The tables behind a store, reassembled (a fresh store must give the same prompts)."""
    out: dict[str, pd.DataFrame] = {
        "index_encounters": store.index.reset_index(drop=True),
        "patients": store.patients.reset_index(drop=True),
    }
    for name in ("encounters", "events", "notes", "reference_plans"):
        out[name] = pd.concat([g[name] for g in store._by_patient.values()], ignore_index=True)
    out["plan_items"] = pd.concat([*store._items.values(), store._no_items], ignore_index=True)
    return out


@pytest.mark.parametrize("budget", [40, 90, 200, 400])
def test_every_method_respects_the_token_budget(
    sample: tuple[ContextStore, list[str]], budget: int
) -> None:
    store, ids = sample
    config = replace(INITIAL_CONFIG, max_tokens=budget)
    refs = [f"reference item {i}" for i in range(30)]
    for eid in ids:
        ctx = store.context(eid)
        for method in METHODS:
            p = method_prompt(method, ctx, SIGNALS, refs, config)
            assert count_tokens(p.system) == p.tokens <= budget, (method, budget)
            assert p.user == QUESTION


def test_trimming_shortens_the_longest_list_first(sample: tuple[ContextStore, list[str]]) -> None:
    store, ids = sample
    ctx = store.context(ids[0])
    full = assemble(ctx, SIGNALS, replace(INITIAL_CONFIG, max_tokens=10_000))
    tight = assemble(ctx, SIGNALS, replace(INITIAL_CONFIG, max_tokens=full.tokens - 1))
    assert tight.config is not None and full.config is not None
    assert tight.config.k_self == INITIAL_CONFIG.k_self - 1  # 8 self items is the longest list
    assert tight.config.k_peer == INITIAL_CONFIG.k_peer
    assert tight.provenance["requested_config"]["k_self"] == INITIAL_CONFIG.k_self


def test_every_fragment_has_provenance(sample: tuple[ContextStore, list[str]]) -> None:
    store, ids = sample
    for eid in ids:
        p = assemble(store.context(eid), SIGNALS, INITIAL_CONFIG)
        names = [f["name"] for f in p.provenance["fragments"]]
        assert names[0] == "profile" and "self" in names and "peer" in names
        for frag in p.provenance["fragments"]:
            if frag["name"] in ("problems", "medications", "encounters"):
                assert frag.get("event_ids") or frag.get("encounter_ids"), frag
            if frag["name"] == "self":
                assert [i["item_key"] for i in frag["items"]] == [
                    f"k{i}" for i in range(INITIAL_CONFIG.k_self)
                ]
                assert all("score" in i for i in frag["items"])
            if frag["name"] == "peer":
                assert frag["min_support"] == 5 and all(i["support"] >= 5 for i in frag["items"])
        # listed event ids are the patient's own, recorded by the index time
        ctx = store.context(eid)
        own = set(ctx.events["event_id"])
        for frag in p.provenance["fragments"]:
            assert set(frag.get("event_ids", [])) <= own


def test_prompts_carry_no_identifiers(
    sample: tuple[ContextStore, list[str]], default_tables: dict[str, pd.DataFrame]
) -> None:
    store, ids = sample
    for eid in ids:
        ctx = store.context(eid)
        birth = str(ctx.patient["birth_date"])
        for method in METHODS:
            text = method_prompt(method, ctx, SIGNALS, ["x"], INITIAL_CONFIG).system
            assert ctx.index["patient_id"] not in text
            assert birth not in text and eid not in text
            assert not any(c in text for c in ctx.encounters["encounter_id"].tail(5))


def test_oracle_lists_the_reference_and_general_nothing(
    sample: tuple[ContextStore, list[str]],
) -> None:
    store, ids = sample
    ctx = store.context(ids[0])
    oracle = method_prompt("oracle", ctx, SIGNALS, ["auscultation of the fetal heart (procedure)"])
    assert "- auscultation of the fetal heart" in oracle.system
    assert method_prompt("general", ctx, SIGNALS).system == ""
    with pytest.raises(ValueError, match="unknown method"):
        method_prompt("magic", ctx, SIGNALS)


def test_signal_frames_group_by_encounter() -> None:
    items = pd.DataFrame(
        {
            "state": [0, 0, 1],
            "encounter_id": ["e1", "e1", "e2"],
            "rank": [2, 1, 1],
            "item_key": ["b", "a", "c"],
            "item_display": ["B", "A", "C"],
            "score": [0.5, 0.9, 0.7],
        }
    )
    reasons = pd.DataFrame({"state": [0], "rank": [1], "feature_display": ["previous plan: A"]})
    statements = pd.DataFrame(
        {
            "encounter_id": ["e1", "e1"],
            "item_key": ["x", "y"],
            "item_display": ["X", "Y"],
            "support": [5, 9],
            "n_peers": [20, 20],
        }
    )
    got = patient_signals_by_encounter(items, reasons, statements, None, model="m", min_support=5)
    assert [i.item_key for i in got["e1"].self_items] == ["a", "b"]
    assert got["e1"].self_items[0].reasons == ("previous plan: A",)
    assert [p.item_key for p in got["e1"].peer_items] == ["y", "x"]
    assert got["e1"].n_peers == 20 and got["e2"].peer_items == ()
