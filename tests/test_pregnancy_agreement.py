"""The four places that ask "is she pregnant?" agree on patients at the edges of the rule.

The obstetric flag (`pipelines.index`), the prompt's profile (`promptenv.fragments`),
the recommender's pregnancy features (`recsys.features`) and the policy's
observation (`promptenv.editing`) all use `pipelines.clinical`; this builds a small
cohort whose visits sit on each edge and checks all four against the expected answer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.clinical import PREGNANCY_MAX_DAYS
from pipelines.index import ContextStore, index_encounters
from pipelines.plans import plans_from_orders
from pipelines.schemas import ENCOUNTERS, EVENTS, NOTES, PATIENTS
from promptenv.editing import patient_features
from promptenv.fragments import PatientSignals, profile
from recsys.interactions import CohortTables, StateSettings, build_dataset

DAY = pd.Timedelta(days=1)
T0 = pd.Timestamp("2020-01-01 10:00", tz="UTC")

#: patient -> (pregnancy condition: display, code, recorded day, end day), then the
#: visit days with the expected answer "pregnant at the end of this visit?".
EDGES: dict[str, tuple[tuple[str, str | None, int, int | None], dict[int, bool]]] = {
    # diagnosed at 8 weeks, never closed: pregnant from the diagnosis to the maximum
    "open": (
        ("Normal pregnancy (finding)", "72892002", 56, None),
        {30: False, 56: True, 120: True, PREGNANCY_MAX_DAYS - 1: True, PREGNANCY_MAX_DAYS: False},
    ),
    # closed at the delivery on day 270
    "delivery": (
        ("Normal pregnancy (finding)", "72892002", 0, 270),
        {100: True, 269: True, 270: False, 290: False},
    ),
    "history-of": (
        ("Past pregnancy history of miscarriage (situation)", "161744009", 0, None),
        {10: False, 100: False},
    ),
    "refuted": (("Pregnancy (refuted)", "77386006", 0, None), {10: False, 100: False}),
    "not-pregnant": (("Not pregnant (finding)", "60001007", 0, None), {10: False}),
    # a SNOMED code with no display still counts
    "code-only": ((None, "77386006", 0, None), {10: True, 200: True}),
}


def _edge_cohort() -> dict[str, pd.DataFrame]:
    patients, encounters, events = [], [], []
    for pid, ((display, code, recorded, end), visits) in EDGES.items():
        patients.append({"patient_id": pid, "birth_date": pd.Timestamp("1990-01-01").date()})
        patients[-1].update(sex="female", source="test")
        events.append(
            {
                "event_id": f"{pid}-pregnancy",
                "patient_id": pid,
                "encounter_id": None,  # not on a visit: the visits' own codes stay non-obstetric
                "time": T0,
                "recorded_time": T0 + recorded * DAY,
                "end_time": pd.NaT if end is None else T0 + end * DAY,
                "kind": "condition",
                "code_system": "http://snomed.info/sct",
                "code": code,
                "display": display,
            }
        )
        # every visit orders the same check, so every visit but the last is an index encounter
        for day in [*visits, max(visits) + 30]:
            eid = f"{pid}-day{day}"
            at = T0 + day * DAY
            encounters.append(
                {
                    "encounter_id": eid,
                    "patient_id": pid,
                    "start": at,
                    "end": at,
                    "class_code": "AMB",
                    "type_system": "http://snomed.info/sct",
                    "type_code": "162673000",
                    "type_display": "General examination of patient (procedure)",
                    "reason_display": "checkup",
                }
            )
            events.append(
                {
                    "event_id": f"{eid}-bp",
                    "patient_id": pid,
                    "encounter_id": eid,
                    "time": at,
                    "recorded_time": at,
                    "kind": "procedure",
                    "code_system": "http://snomed.info/sct",
                    "code": "46973005",
                    "display": "Blood pressure taking (procedure)",
                }
            )
    frames = {
        "patients": pd.DataFrame(patients).reindex(columns=PATIENTS.names),
        "encounters": pd.DataFrame(encounters).reindex(columns=ENCOUNTERS.names),
        "events": pd.DataFrame(events).reindex(columns=EVENTS.names),
        "notes": pd.DataFrame(columns=NOTES.names),
    }
    for name in ("encounters", "events"):
        for col in ("start", "end", "time", "recorded_time", "end_time"):
            if col in frames[name]:
                frames[name][col] = pd.to_datetime(frames[name][col], utc=True)
    plans, items = plans_from_orders(frames["events"], frames["encounters"])
    index = index_encounters(frames["encounters"], frames["events"], frames["patients"], plans)
    return {
        **frames,
        "reference_plans": plans,
        "plan_items": items,
        "index_encounters": index.assign(split="train"),  # every state builds the vocabulary
    }


def test_the_four_call_sites_agree_at_the_edges() -> None:
    tables = _edge_cohort()
    idx = tables["index_encounters"]
    expected = {
        f"{pid}-day{day}": pregnant
        for pid, (_, visits) in EDGES.items()
        for day, pregnant in visits.items()
    }
    assert set(idx["encounter_id"]) == set(expected)

    states = build_dataset(
        CohortTables.from_frames(tables), StateSettings(min_feature_states=1, min_item_patients=1)
    )
    features = list(states.vocab.features)
    active = states.features[:, features.index("pregnancy:active")].toarray().ravel() > 0
    stage_columns = [i for i, f in enumerate(features) if f.startswith("pregnancy:weeks_")]
    by_state = dict(zip(states.keys["encounter_id"], range(len(states)), strict=True))

    store = ContextStore(tables)
    answers = {}
    for row in idx.itertuples():
        ctx = store.context(row.encounter_id)
        text = profile(ctx, PatientSignals(), 3).text
        observed = patient_features(ctx, PatientSignals(), bool(row.is_obstetric))
        state = by_state[row.encounter_id]
        answers[row.encounter_id] = {
            "obstetric flag": bool(row.is_obstetric),
            "prompt profile": "Currently pregnant" in text,
            "recommender feature": bool(active[state]),
            "policy observation": bool(observed[1] == 1.0),
        }
        # a pregnant state has exactly one stage; a state that is not pregnant has none
        n_stages = states.features[state, stage_columns].nnz
        assert n_stages == int(active[state]), row.encounter_id
    wrong = {
        eid: {where: got for where, got in sites.items() if got != expected[eid]}
        for eid, sites in answers.items()
    }
    wrong = {eid: sites for eid, sites in wrong.items() if sites}
    assert not wrong, f"call sites that got it wrong (visit: site -> answer): {wrong}"


def test_how_far_along_agrees_between_prompt_and_features() -> None:
    tables = _edge_cohort()
    states = build_dataset(
        CohortTables.from_frames(tables), StateSettings(min_feature_states=1, min_item_patients=1)
    )
    features = np.array(states.vocab.features)
    store = ContextStore(tables)
    for row, eid in enumerate(states.keys["encounter_id"]):
        text = profile(store.context(eid), PatientSignals(), 3).text
        if "Currently pregnant" not in text:
            continue
        weeks = int(text.split("about ")[1].split(" weeks")[0])
        stage = [f for f in features[states.features[row].indices] if f.startswith("pregnancy:w")]
        want = "weeks_0-12" if weeks < 13 else "weeks_13-27" if weeks < 28 else "weeks_28+"
        assert stage == [f"pregnancy:{want}"], (eid, weeks, stage)
