"""Index encounters, the per-patient split, obstetric flags, and the leakage guarantee."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.clinical import active_pregnancies
from pipelines.index import OBSTETRIC_PATTERN, _obstetric_flags, context_as_of, split_of
from pipelines.schemas import EVENTS, INDEX_ENCOUNTERS, SPLITS


def test_split_is_per_patient_deterministic_and_near_its_fractions() -> None:
    ids = [f"p{i:05d}" for i in range(5000)]
    splits = [split_of(p) for p in ids]
    assert splits == [split_of(p) for p in ids]
    share = pd.Series(splits).value_counts(normalize=True)
    assert abs(share["train"] - 0.7) < 0.03 and abs(share["test"] - 0.15) < 0.03
    assert [split_of(p, seed=1) for p in ids] != splits
    with pytest.raises(ValueError, match="sum to 1"):
        split_of("p1", fractions=(0.5, 0.5, 0.5))


def test_index_encounters_of_the_default_cohort(default_tables: dict[str, pd.DataFrame]) -> None:
    idx = default_tables["index_encounters"]
    assert list(idx.columns) == INDEX_ENCOUNTERS.names
    assert len(idx) > 1000
    # a patient is in exactly one split, and every split has patients
    assert (idx.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(idx["split"]) == set(SPLITS)
    # the next encounter starts strictly after the index time and has a non-empty plan
    assert (idx["next_time"] > idx["index_time"]).all()
    plans = default_tables["reference_plans"].set_index("encounter_id")
    assert (
        plans.loc[idx["next_encounter_id"], "n_items"].to_numpy() == idx["n_plan_items"].to_numpy()
    ).all()
    assert (idx["n_plan_items"] > 0).all()
    # it is the *next* one: no encounter of the patient starts between the two
    enc = default_tables["encounters"]
    sample = idx.sample(300, random_state=0)
    for row in sample.itertuples():
        mine = enc[enc["patient_id"] == row.patient_id]
        between = mine[(mine["start"] > row.index_time) & (mine["start"] < row.next_time)]
        assert between.empty


def test_obstetric_flags_follow_prenatal_care(default_tables: dict[str, pd.DataFrame]) -> None:
    idx = default_tables["index_encounters"]
    enc = default_tables["encounters"].set_index("encounter_id")
    kinds = enc.loc[idx["encounter_id"], "type_display"].fillna("").str.lower().to_numpy()
    prenatal = np.char.find(kinds.astype(str), "prenatal") >= 0
    assert prenatal.sum() > 50
    assert idx["is_obstetric"].to_numpy()[prenatal].all(), (
        "a prenatal visit is not flagged obstetric"
    )
    share = idx["is_obstetric"].mean()
    assert 0.02 < share < 0.6, share
    # obstetric encounters happen to adults of childbearing age in this cohort, not to infants
    assert idx.loc[idx["is_obstetric"], "age_years"].min() > 10


def test_obstetric_flags_cover_every_active_pregnancy(
    default_tables: dict[str, pd.DataFrame],
) -> None:
    """The flag uses the one pregnancy rule: pregnant at the index time means obstetric."""
    idx = default_tables["index_encounters"]
    queries = pd.DataFrame({"patient_id": idx["patient_id"], "at": idx["index_time"]})
    pregnant = active_pregnancies(default_tables["events"], queries)["pregnant"].to_numpy()
    assert pregnant.sum() > 500  # the cohort is of women aged 18-45: many pregnancies
    assert idx["is_obstetric"].to_numpy()[pregnant].all()


def test_no_leakage_in_patient_context(default_tables: dict[str, pd.DataFrame]) -> None:
    """Nothing recorded after the index time reaches a patient's context."""
    idx = default_tables["index_encounters"]
    sample = pd.concat(
        [idx[idx["is_obstetric"]].sample(40, random_state=1), idx.sample(40, random_state=2)]
    )
    for row in sample.itertuples():
        ctx = context_as_of(default_tables, row.encounter_id)
        t = ctx.index_time
        assert ctx.patient["patient_id"] == row.patient_id
        for name, frame, cols in (
            ("encounters", ctx.encounters, ("start", "end")),
            ("events", ctx.events, ("time", "recorded_time", "end_time")),
            ("notes", ctx.notes, ("time",)),
            ("reference_plans", ctx.reference_plans, ("time",)),
        ):
            assert (frame["patient_id"] == row.patient_id).all(), name
            for col in cols:
                assert (frame[col].dropna() <= t).all(), f"{name}.{col} after the index time"
        # the reference itself (the next encounter and its plan) is not in the context
        assert row.next_encounter_id not in set(ctx.encounters["encounter_id"])
        assert row.next_encounter_id not in set(ctx.events["encounter_id"].dropna())
        assert row.next_encounter_id not in set(ctx.notes["encounter_id"].dropna())
        assert row.next_encounter_id not in set(ctx.plan_items["encounter_id"])
        # and the context is complete: every event of hers up to t is there
        ev = default_tables["events"]
        mine = ev[(ev["patient_id"] == row.patient_id) & (ev["recorded_time"] <= t)]
        assert len(ctx.events) == len(mine)


def test_leakage_guard_cuts_a_planted_future(default_tables: dict[str, pd.DataFrame]) -> None:
    """Facts planted after the index time (a later event, a later end) never appear."""
    idx = default_tables["index_encounters"]
    row = idx[idx["is_obstetric"]].iloc[0]
    t = row["index_time"]
    tables = dict(default_tables)
    events = tables["events"]
    own = (
        events[(events["patient_id"] == row["patient_id"]) & (events["recorded_time"] <= t)]
        .iloc[[0]]
        .copy()
    )
    later = t + pd.Timedelta(seconds=1)
    future = own.assign(event_id="planted-future", time=later, recorded_time=later)
    # happened before t, but only recorded at a later visit (a late diagnosis)
    late = own.assign(event_id="planted-late", time=t - pd.Timedelta(days=60), recorded_time=later)
    abated = own.assign(
        event_id="planted-abated", time=t, recorded_time=t, end_time=t + pd.Timedelta(days=30)
    )
    tables["events"] = pd.concat([events, future, late, abated], ignore_index=True)
    ctx = context_as_of(tables, row["encounter_id"])
    assert "planted-future" not in set(ctx.events["event_id"])
    assert "planted-late" not in set(ctx.events["event_id"])
    kept = ctx.events.set_index("event_id").loc["planted-abated"]
    assert pd.isna(kept["end_time"])  # a later abatement is unknown at t


def test_unknown_encounter_is_a_clear_error(default_tables: dict[str, pd.DataFrame]) -> None:
    with pytest.raises(KeyError, match="is not an index encounter"):
        context_as_of(default_tables, "no-such-encounter")


@pytest.mark.parametrize(
    ("display", "obstetric"),
    [
        ("Medical induction of labor (procedure)", True),
        ("Augmentation of labor (procedure)", True),
        ("Labour pains (finding)", True),
        ("Premature labor", True),
        ("Instrumental delivery (procedure)", True),
        ("Pre-eclampsia (disorder)", True),
        ("Preeclampsia", True),
        ("Auscultation of the fetal heart (procedure)", True),
        ("Laboratory test (procedure)", False),
        ("Not in labor force (finding)", False),
        ("Collaborative care", False),
        ("General examination of patient (procedure)", False),
    ],
)
def test_the_obstetric_pattern_reads_labour_as_a_word(display: str, obstetric: bool) -> None:
    assert bool(OBSTETRIC_PATTERN.search(display)) is obstetric


def test_a_mans_check_up_with_the_labour_force_finding_is_not_obstetric() -> None:
    """Synthea records "Not in labor force" at general check-ups, men's too: it flagged them."""
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    idx = pd.DataFrame(
        {"encounter_id": ["e1", "e2"], "patient_id": ["m", "w"], "index_time": [t0, t0]}
    )
    enc = pd.DataFrame(
        {
            "encounter_id": ["e1", "e2"],
            "type_display": ["General examination of patient (procedure)", "Prenatal visit"],
            "reason_display": [None, None],
        }
    )
    shown = {
        "Not in labor force (finding)": "observation",
        "Laboratory test (procedure)": "procedure",
    }
    events = pd.DataFrame(
        [
            {"event_id": f"v{i}", "patient_id": "m", "encounter_id": "e1", "time": t0}
            | {"recorded_time": t0, "kind": kind, "display": display}
            for i, (display, kind) in enumerate(shown.items())
        ],
        columns=EVENTS.names,
    )
    assert _obstetric_flags(idx, enc, events).tolist() == [False, True]
