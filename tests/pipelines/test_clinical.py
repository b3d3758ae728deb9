"""The one definition of "pregnant at a time": what counts, when it starts and ends, no leakage."""

from __future__ import annotations

import pandas as pd
import pytest

from pipelines.clinical import (
    ACTIVE_PREGNANCY_COLUMNS,
    PREGNANCY_MAX_DAYS,
    active_pregnancies,
    active_pregnancy,
    pregnancy_records,
)

DAY = pd.Timedelta(days=1)
T0 = pd.Timestamp("2020-01-01", tz="UTC")


def condition(
    event_id: str,
    display: str | None,
    code: str | None = None,
    onset: pd.Timestamp = T0,
    recorded_days: int = 0,
    end_days: int | None = None,
    patient: str = "p1",
    kind: str = "condition",
) -> dict[str, object]:
    return {
        "event_id": event_id,
        "patient_id": patient,
        "kind": kind,
        "time": onset,
        "recorded_time": onset + recorded_days * DAY,
        "end_time": pd.NaT if end_days is None else onset + end_days * DAY,
        "code": code,
        "display": display,
    }


def test_what_counts_as_a_pregnancy_record() -> None:
    events = pd.DataFrame(
        [
            condition("normal", "Normal pregnancy (finding)", "72892002"),
            condition("code-only", None, "77386006"),
            condition("words-only", "Tubal pregnancy (disorder)", "79586000"),
            condition("history", "Past pregnancy history of miscarriage (situation)", "161744009"),
            condition("not", "Not pregnant (finding)", "60001007"),
            condition("refuted", "Pregnancy (refuted)", "77386006"),
            condition("ruled-out", "Pregnancy ruled out", None),
            condition("a-test", "Standard pregnancy test (procedure)", None, kind="procedure"),
            condition("other", "Hypertension", "38341003"),
        ]
    )
    counted = set(events.loc[pregnancy_records(events), "event_id"])
    assert counted == {"normal", "code-only", "words-only"}


def test_a_pregnancy_starts_when_recorded_and_ends_at_its_end_or_the_maximum() -> None:
    events = pd.DataFrame(
        [
            # diagnosed 8 weeks after onset, never closed
            condition("open", "Normal pregnancy", recorded_days=56, patient="open"),
            # closed at delivery on day 270
            condition("delivered", "Normal pregnancy", end_days=270, patient="delivered"),
            # closed on day 330: still capped at the maximum (the end is not known before it)
            condition("long", "Normal pregnancy", end_days=330, patient="long"),
        ]
    )
    days = {
        "open": [55, 56, PREGNANCY_MAX_DAYS - 1, PREGNANCY_MAX_DAYS, 400],
        "delivered": [0, 269, 270, 271],
        "long": [299, 300, 320],
    }
    queries = pd.DataFrame(
        [{"patient_id": p, "at": T0 + d * DAY} for p, ds in days.items() for d in ds],
        index=[f"{p}@{d}" for p, ds in days.items() for d in ds],
    )
    found = active_pregnancies(events, queries)
    assert list(found.columns) == list(ACTIVE_PREGNANCY_COLUMNS)
    assert list(found.index) == list(queries.index)
    pregnant = {key for key, row in found.iterrows() if row["pregnant"]}
    assert pregnant == {"open@56", "open@299", "delivered@0", "delivered@269", "long@299"}
    assert found.loc["open@56", "event_id"] == "open"
    assert found.loc["open@56", "weeks"] == pytest.approx(8.0)
    assert found.loc["delivered@270"].isna()[["event_id", "onset", "weeks"]].all()


def test_one_time_agrees_with_many_and_ignores_later_records() -> None:
    events = pd.DataFrame(
        [
            condition("first", "Normal pregnancy", end_days=100),
            condition("second", "Normal pregnancy", onset=T0 + 150 * DAY),
            condition("later", "Normal pregnancy", onset=T0 + 160 * DAY, recorded_days=30),
        ]
    )
    for day in (-1, 50, 120, 155, 170, 189, 190, 400):
        at = T0 + day * DAY
        one = active_pregnancy(events, at)
        many = active_pregnancies(events, pd.DataFrame({"patient_id": ["p1"], "at": [at]}))
        assert (one is not None) == bool(many["pregnant"].iloc[0]), day
        if one is not None:
            assert one.event_id == many["event_id"].iloc[0]
            assert one.whole_weeks == int((at - one.onset).days // 7)
    # two active pregnancy records: the one with the latest onset is the current one
    current = active_pregnancy(events, T0 + 190 * DAY)
    assert current is not None and current.event_id == "later"
    before = active_pregnancy(events, T0 + 189 * DAY)  # "later" not recorded yet
    assert before is not None and before.event_id == "second"
    # a context's record has later facts removed and later ends cut: same answer
    at = T0 + 50 * DAY
    cut = events[events["recorded_time"] <= at].assign(end_time=pd.NaT)
    assert active_pregnancy(cut, at) == active_pregnancy(events, at)


def test_events_without_recorded_time_count_from_onset() -> None:
    events = pd.DataFrame([condition("open", "Normal pregnancy", recorded_days=56)])
    at = T0 + 10 * DAY
    assert active_pregnancy(events, at) is None
    assert active_pregnancy(events.drop(columns=["recorded_time"]), at) is not None


def test_queries_without_a_time_column_are_a_clear_error() -> None:
    events = pd.DataFrame([condition("open", "Normal pregnancy")])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['at'\]"):
        active_pregnancies(events, pd.DataFrame({"patient_id": ["p1"], "time": [T0]}))
