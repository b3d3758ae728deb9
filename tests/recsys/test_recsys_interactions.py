"""Patient states: alignment, targets, vocabulary from train only, and no leakage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic_cohort import synthetic_cohort

from recsys.interactions import (
    CohortTables,
    PatientStates,
    bootstrap_states,
    build_dataset,
    build_states,
    micros,
)


def test_one_row_per_index_encounter_and_aligned_matrices(
    states: PatientStates, cohort_frames: dict[str, pd.DataFrame]
) -> None:
    n = len(cohort_frames["index_encounters"])
    assert len(states) == n
    assert set(states.keys["encounter_id"]) == set(
        cohort_frames["index_encounters"]["encounter_id"]
    )
    for matrix, width in (
        (states.features, states.n_features),
        (states.history, states.n_items),
        (states.last_plan, states.n_items),
        (states.targets, states.n_items),
    ):
        assert matrix is not None
        assert matrix.shape == (n, width)
        assert matrix.dtype == np.float32
        assert matrix.has_canonical_format
    keys = states.keys
    ordered = keys.sort_values(["patient_id", "index_time", "encounter_id"]).index
    assert list(ordered) == list(range(n))
    assert states.n_items > 10 and states.n_features > 30


def test_targets_are_the_next_encounters_plan_items(
    states: PatientStates, cohort_frames: dict[str, pd.DataFrame]
) -> None:
    plan = cohort_frames["plan_items"].groupby("encounter_id")["item_key"].agg(set)
    targets, n_true = states.require_targets()
    items = np.array(states.vocab.items)
    for row in range(0, len(states), 7):
        expected = plan[states.keys["next_encounter_id"].iloc[row]]
        got = set(items[targets[row].indices])
        assert got == expected & set(items)
        assert n_true[row] == len(expected)


def test_last_plan_is_the_latest_plan_at_or_before_index_time(
    states: PatientStates, cohort_frames: dict[str, pd.DataFrame]
) -> None:
    enc = cohort_frames["encounters"].set_index("encounter_id")
    # a plan is on record once its encounter has ended
    plans = cohort_frames["plan_items"].assign(written=lambda f: f["encounter_id"].map(enc["end"]))
    items = np.array(states.vocab.items)
    for row in range(0, len(states), 5):
        key = states.keys.iloc[row]
        mine = plans[
            (plans["patient_id"] == key["patient_id"]) & (plans["written"] <= key["index_time"])
        ]
        got = set(items[states.last_plan[row].indices])
        if mine.empty:
            assert got == set()
            continue
        latest = mine[mine["written"] == mine["written"].max()]
        assert got == set(latest["item_key"]) & set(items)


def test_vocabulary_comes_from_train_patients_only() -> None:
    frames = synthetic_cohort(n_patients=30, seed=3)
    idx = frames["index_encounters"]
    test_patient = idx.loc[idx["split"] == "test", "patient_id"].iloc[0]
    enc = frames["encounters"]
    target_enc = enc.loc[enc["patient_id"] == test_patient, "encounter_id"].iloc[1]
    extra_item = pd.DataFrame(
        {
            "encounter_id": [target_enc],
            "patient_id": [test_patient],
            "position": [99],
            "kind": ["procedure"],
            "item_key": ["TEST|only-in-test"],
            "code_system": ["TEST"],
            "code": ["only-in-test"],
            "display": ["a procedure only a test patient had"],
        }
    )
    frames["plan_items"] = pd.concat([frames["plan_items"], extra_item], ignore_index=True)
    first_event = frames["events"][frames["events"]["patient_id"] == test_patient].iloc[[0]]
    frames["events"] = pd.concat(
        [frames["events"], first_event.assign(kind="condition", code="rare-test-only")],
        ignore_index=True,
    )
    states = build_dataset(CohortTables.from_frames(frames))
    assert "TEST|only-in-test" not in states.vocab.items
    assert not any("rare-test-only" in f for f in states.vocab.features)
    # the test patient's next-plan item still counts in her recall denominator
    row = np.flatnonzero(states.keys["next_encounter_id"].to_numpy() == target_enc)
    assert len(row) == 1
    targets, n_true = states.require_targets()
    assert n_true[row[0]] == targets[row[0]].nnz + 1


def _as_of(
    frames: dict[str, pd.DataFrame], patient: str, t: pd.Timestamp
) -> dict[str, pd.DataFrame]:
    """The patient's record as it stood at time t: later facts removed, later ends unknown."""
    ev = frames["events"]
    ev = ev[(ev["patient_id"] == patient) & (ev["recorded_time"] <= t)].copy()
    ev.loc[ev["end_time"] > t, "end_time"] = pd.NaT
    enc = frames["encounters"]
    enc = enc[(enc["patient_id"] == patient) & (enc["start"] <= t)]
    plans = frames["plan_items"]
    plans = plans[plans["encounter_id"].isin(enc["encounter_id"])]
    return {
        "events": ev,
        "encounters": enc,
        "plan_items": plans,
        "patients": frames["patients"],
    }


def test_no_information_after_index_time(
    states: PatientStates, cohort_frames: dict[str, pd.DataFrame]
) -> None:
    """A state built from the full record equals one built from the record truncated at
    its index_time, including back-dated facts (recorded after their onset)."""
    keys = states.keys
    obstetric = np.flatnonzero(keys["is_obstetric"].to_numpy())
    rows = np.concatenate([obstetric[::9], np.arange(0, len(states), 53)])
    assert len(obstetric) and len(rows) >= 10
    index = cohort_frames["index_encounters"].set_index("encounter_id")
    checked_backdated = 0
    for row in rows:
        key = keys.iloc[row]
        t = key["index_time"]
        truncated = _as_of(cohort_frames, key["patient_id"], t)
        ev = cohort_frames["events"]
        later = ev[(ev["patient_id"] == key["patient_id"]) & (ev["recorded_time"] > t)]
        checked_backdated += int((later["time"] <= t).sum())
        one = build_states(
            CohortTables.from_frames(
                {**truncated, "index_encounters": index.loc[[key["encounter_id"]]].reset_index()}
            ),
            states.vocab,
        )
        for name in ("features", "history", "last_plan"):
            full = getattr(states, name)[row]
            cut = getattr(one, name)[0]
            assert (full != cut).nnz == 0, (name, key["encounter_id"])
    # the check covered facts whose onset is before index_time but were recorded later
    assert checked_backdated > 0


def test_build_states_uses_the_saved_vocabulary(
    states: PatientStates, cohort_tables: CohortTables, cohort_frames: dict[str, pd.DataFrame]
) -> None:
    again = build_states(cohort_tables, states.vocab)
    assert again.vocab.fingerprint == states.vocab.fingerprint
    assert (again.features != states.features).nnz == 0
    assert (again.require_targets()[0] != states.require_targets()[0]).nnz == 0
    # new codes in new data are dropped, not added as columns
    frames = dict(cohort_frames)
    frames["events"] = pd.concat(
        [frames["events"], frames["events"].iloc[[0]].assign(code="brand-new-code")],
        ignore_index=True,
    )
    grown = build_states(CohortTables.from_frames(frames), states.vocab)
    assert grown.features.shape == states.features.shape
    # only the per-kind event counts may move (one more event); no column appears
    coded = [i for i, f in enumerate(states.vocab.features) if not f.startswith("count_")]
    assert (grown.features[:, coded] != states.features[:, coded]).nnz == 0


def test_events_without_recorded_time_fall_back_to_time(
    cohort_frames: dict[str, pd.DataFrame], states: PatientStates
) -> None:
    frames = dict(cohort_frames)
    frames["events"] = frames["events"].drop(columns=["recorded_time"])
    old = build_states(CohortTables.from_frames(frames), states.vocab)
    assert old.features.shape == states.features.shape
    # only back-dated facts (the pregnancy onsets) can differ, and they appear earlier
    assert (old.features != states.features).nnz > 0
    preg = [i for i, f in enumerate(states.vocab.features) if f.startswith("pregnancy:active")]
    assert preg
    assert old.features[:, preg].sum() > states.features[:, preg].sum()


def test_subset_and_split(states: PatientStates) -> None:
    test = states.split("test")
    assert set(test.keys["split"]) == {"test"}
    rows = np.flatnonzero((states.keys["split"] == "test").to_numpy())
    assert (test.features != states.features[rows]).nnz == 0
    pick = states.subset([5, 2])
    assert list(pick.keys["encounter_id"]) == list(states.keys["encounter_id"].iloc[[5, 2]])


def test_patient_split_is_by_patient(states: PatientStates) -> None:
    per_patient = states.keys.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()


def test_bootstrap_keeps_patients_whole_under_new_ids(states: PatientStates) -> None:
    boot = bootstrap_states(states, 2500, seed=1)
    assert len(boot) == 2500
    assert boot.vocab is states.vocab
    assert not set(boot.keys["patient_id"]) & set(states.keys["patient_id"])
    assert boot.keys["encounter_id"].is_unique
    assert (boot.keys.groupby("patient_id")["split"].nunique() == 1).all()
    # a copy carries the original rows' matrices
    original = boot.keys["encounter_id"].str.split("~").str[0]
    pos = pd.Series(np.arange(len(states)), index=states.keys["encounter_id"])[original].to_numpy()
    assert (boot.features != states.features[pos]).nnz == 0
    assert np.array_equal(boot.keys["index_us"].to_numpy(), states.keys["index_us"].to_numpy()[pos])


def test_micros_is_exact_and_marks_missing() -> None:
    values = pd.Series(
        pd.to_datetime(["1970-01-01T00:00:00.000001Z", None], format="ISO8601", utc=True)
    )
    out = micros(values, missing=-7)
    assert out.tolist() == [1, -7]


def test_states_reject_misaligned_matrices(states: PatientStates) -> None:
    with pytest.raises(ValueError, match="features"):
        PatientStates(
            states.keys.iloc[:3],
            states.features,
            states.history[:3],
            states.last_plan[:3],
            None,
            None,
            states.vocab,
        )
