"""Clinical concepts defined once, for every package: is a patient pregnant at a time?

The obstetric flag of the index encounters (`pipelines.index`), the prompt's
profile (`promptenv.fragments`), the recommender's pregnancy features
(`recsys.features`) and the policy's observation (`promptenv.editing`) all ask
:func:`active_pregnancy` (one patient's record at one time) or
:func:`active_pregnancies` (many patients and times at once, the same rule), so
they cannot disagree about a patient.

The rule. A *pregnancy record* is a condition whose SNOMED code says pregnancy
(:data:`PREGNANCY_CODES`) or whose display contains "pregnan", unless its display
or code says the opposite: a history of (``Past pregnancy history of
miscarriage``), not pregnant, refuted, ruled out, entered in error. It makes
the patient pregnant at time ``at`` when all of these hold:

- it was **recorded** at or before ``at`` (``recorded_time``: a pregnancy
  diagnosed at the first prenatal visit is not known before that visit, though
  its onset is weeks earlier), and its onset is at or before ``at``;
- it has **not ended** by ``at``: no end recorded, or the end (abatement, which
  the sources record at the delivery, miscarriage or termination) lies after
  ``at``;
- fewer than :data:`PREGNANCY_MAX_DAYS` (300 days, about 43 weeks) have passed
  since its onset.

Why this rule. It reads only what was on record at ``at``: an end after ``at``
is not known yet, so a pregnancy whose end is still to come is treated like one
with no end at all and lasts at most 300 days (a human pregnancy rarely lasts
more than 42 weeks; beyond that an open pregnancy record is a record nobody
closed). Using the future end instead would let the outcome leak into the past.
It is also the rule the prompt profile followed, so the built-in cohort's prompt
text does not change. When several pregnancy records are active, the one with
the latest onset (then the latest recorded, then the largest event id) is the
current pregnancy, and its onset gives "how far along".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd

#: A pregnancy with no end on record counts as ongoing for less than this after its onset.
PREGNANCY_MAX_DAYS: Final = 300
#: SNOMED CT: normal pregnancy, pregnant (finding), teenage pregnancy.
PREGNANCY_CODES: Final = frozenset({"72892002", "77386006", "237240001"})
#: Regular expressions, matched ignoring case (plain strings: pyarrow matches them natively).
PREGNANCY_DISPLAY: Final = r"pregnan"
#: Displays that mention pregnancy but do not say she is pregnant now.
NOT_PREGNANT_DISPLAY: Final = (
    r"history of|not pregnant|no longer pregnant|refuted|ruled out|entered in error"
)
#: SNOMED CT: not pregnant (finding); past pregnancy history of miscarriage (situation).
NOT_PREGNANT_CODES: Final = frozenset({"60001007", "161744009"})

#: Columns of the frame :func:`active_pregnancies` returns.
ACTIVE_PREGNANCY_COLUMNS: Final = ("pregnant", "event_id", "onset", "weeks")
_WEEK = pd.Timedelta(weeks=1)


@dataclass(frozen=True)
class Pregnancy:
    """The current pregnancy at a time: the condition that records it and how far along it is."""

    event_id: str
    onset: pd.Timestamp
    weeks: float  # (at - onset) in weeks, fractional

    @property
    def whole_weeks(self) -> int:
        """Completed weeks since the onset, as a person says it."""
        return int(self.weeks)


def pregnancy_records(events: pd.DataFrame) -> npt.NDArray[np.bool_]:
    """Which rows of ``events`` are pregnancy records (the first part of the rule above).

    ``events`` needs the columns ``kind``, ``code`` and ``display`` of the events table.
    """
    rows = np.flatnonzero((events["kind"] == "condition").to_numpy(dtype=bool))
    display = events["display"].iloc[rows].fillna("").astype("str")
    code = events["code"].iloc[rows].astype("str")
    maybe = (
        display.str.contains(PREGNANCY_DISPLAY, case=False) | code.isin(PREGNANCY_CODES)
    ).to_numpy(bool)
    rows, display, code = rows[maybe], display[maybe], code[maybe]
    says_not = display.str.contains(NOT_PREGNANT_DISPLAY, case=False) | code.isin(
        NOT_PREGNANT_CODES
    )
    out = np.zeros(len(events), dtype=bool)
    out[rows[~says_not.to_numpy(dtype=bool)]] = True
    return out


_UTC_US = pd.DatetimeTZDtype("us", "UTC")


def _utc(values: pd.Series) -> pd.Series:
    if values.dtype == _UTC_US:  # as the tables store them: nothing to convert
        return values
    return pd.to_datetime(values, utc=True).dt.as_unit("us")


def _records(events: pd.DataFrame) -> pd.DataFrame:
    """The pregnancy records of ``events``: patient_id, event_id, onset, recorded, end (UTC)."""
    records = events.loc[pregnancy_records(events)]
    onset = _utc(records["time"])
    recorded = _utc(records["recorded_time"]) if "recorded_time" in records else onset
    return pd.DataFrame(
        {
            "patient_id": records["patient_id"].to_numpy(),
            "event_id": records["event_id"].astype("str").to_numpy(),
            "onset": onset.array,
            # a missing recorded time, or one before the onset, means "recorded at onset"
            "recorded": recorded.where(recorded.notna() & (recorded > onset), onset).array,
            "end": _utc(records["end_time"]).array,
        }
    )


def _active_at(records: pd.DataFrame, at: pd.Series | pd.Timestamp) -> npt.NDArray[np.bool_]:
    """Which records make her pregnant at ``at`` (one time, or one per record row)."""
    since = at - records["onset"]
    active = (
        (records["recorded"] <= at)
        & (since >= pd.Timedelta(0))
        & (since < pd.Timedelta(days=PREGNANCY_MAX_DAYS))
        & (records["end"].isna() | (records["end"] > at))
    )
    return active.to_numpy(dtype=bool)


#: Among the active records, the current pregnancy is the last in this order.
_CURRENT_ORDER = ["onset", "recorded", "event_id"]


def active_pregnancy(events: pd.DataFrame, at: pd.Timestamp) -> Pregnancy | None:
    """The pregnancy active at ``at`` among one patient's ``events``, or None.

    ``events`` are one patient's rows of the events table, e.g. a
    `PatientContext`'s (see :func:`active_pregnancies` for the columns); rows
    recorded after ``at`` may be included: they are ignored.
    """
    records = _records(events)
    if records.empty:
        return None
    when = pd.Timestamp(at)
    when = when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")
    active = records[_active_at(records, when)]
    if active.empty:
        return None
    current = active.sort_values(_CURRENT_ORDER, kind="stable").iloc[-1]
    onset = pd.Timestamp(current["onset"])
    return Pregnancy(str(current["event_id"]), onset, (when - onset) / _WEEK)


def active_pregnancies(events: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
    """:func:`active_pregnancy` for many (patient, time) queries in one vectorized pass.

    Args:
        events: rows of the events table (``event_id``, ``patient_id``, ``kind``,
            ``time``, ``recorded_time``, ``end_time``, ``code``, ``display``; a
            missing ``recorded_time`` column or value means "recorded at onset").
        queries: one query per row, columns ``patient_id`` and ``at`` (e.g. every
            index encounter and its index time).

    Returns:
        A frame with the index of ``queries`` and the columns
        ``ACTIVE_PREGNANCY_COLUMNS``: ``pregnant`` (bool), and for pregnant rows the
        ``event_id`` and ``onset`` of the current pregnancy and ``weeks`` since its
        onset (float; NaN otherwise).
    """
    missing = {"patient_id", "at"} - set(queries.columns)
    if missing:
        raise ValueError(
            f"active_pregnancies: the queries frame lacks column(s) {sorted(missing)}; "
            "give one row per query with the columns patient_id and at"
        )
    asked = pd.DataFrame(
        {
            "patient_id": queries["patient_id"].to_numpy(),
            "at": _utc(queries["at"]).array,
            "row": np.arange(len(queries)),
        }
    )
    pairs = asked.merge(_records(events), on="patient_id")
    current = (
        pairs[_active_at(pairs, pairs["at"])]
        .sort_values(["row", *_CURRENT_ORDER], kind="stable")
        .drop_duplicates("row", keep="last")
    )
    rows = current["row"].to_numpy()
    n = len(queries)
    out = pd.DataFrame(
        {
            "pregnant": np.zeros(n, dtype=bool),
            "event_id": pd.Series([None] * n, dtype="object"),
            "onset": pd.Series(pd.NaT, index=range(n), dtype="datetime64[us, UTC]"),
            "weeks": np.full(n, np.nan),
        }
    )
    out.loc[rows, "pregnant"] = True
    out.loc[rows, "event_id"] = current["event_id"].to_numpy()
    out.loc[rows, "onset"] = current["onset"].array
    out.loc[rows, "weeks"] = ((current["at"] - current["onset"]) / _WEEK).to_numpy()
    out.index = queries.index
    return out
