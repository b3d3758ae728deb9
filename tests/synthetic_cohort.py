"""A seeded generator of small synthetic cohorts in the canonical tables.

The frames have exactly the columns of :mod:`pipelines.schemas`, so they can be
written with ``Workspace.write_table`` and read back by every step. The cohort
has structure a recommender can learn (pregnancies with trimester-dependent
prenatal plans, chronic conditions with their follow-up plans, yearly wellness
visits, orders carried out at the following encounter), so tests can check that
personalized models beat popularity without any real data. It is test data, so
it lives with the tests (``tests/`` is on the path of every test module; the
scale benchmark, ``benchmarks/recsys_scale.py``, puts it there itself).

Usage::

    frames = synthetic_cohort(n_patients=60, seed=0)
    frames["index_encounters"].head()
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.schemas import TABLES


@dataclass(frozen=True)
class _Item:
    kind: str  # plan item kind
    system: str
    code: str
    display: str

    @property
    def key(self) -> str:
        return f"{self.system}|{self.code}"

    @property
    def event_kind(self) -> str:
        return "observation" if self.kind == "lab" else self.kind


_ITEMS: dict[str, _Item] = {
    # prenatal
    "antenatal_care": _Item("careplan", "SNOMED", "134435003", "Routine antenatal care"),
    "hemoglobin": _Item("lab", "LOINC", "718-7", "Hemoglobin [Mass/volume] in Blood"),
    "urine_culture": _Item("lab", "LOINC", "630-4", "Bacteria identified in Urine by Culture"),
    "ultrasound": _Item("procedure", "SNOMED", "268556000", "Ultrasound scan for fetal viability"),
    "glucose_tolerance": _Item("lab", "LOINC", "1504-0", "Glucose 1 hour post 50 g glucose"),
    "prenatal_vitamins": _Item("medication", "RXNORM", "802367", "Prenatal multivitamin tablet"),
    "tdap": _Item("immunization", "CVX", "115", "Tdap vaccine"),
    "gbs_test": _Item("lab", "LOINC", "11475-1", "Group B streptococcus culture"),
    "fetal_monitoring": _Item("procedure", "SNOMED", "410006001", "Fetal heart monitoring"),
    "postpartum_care": _Item("careplan", "SNOMED", "384729004", "Postnatal care plan"),
    "contraception": _Item("careplan", "SNOMED", "389095005", "Contraception care"),
    # diabetes
    "hba1c": _Item("lab", "LOINC", "4548-4", "Hemoglobin A1c"),
    "metformin": _Item("medication", "RXNORM", "860975", "Metformin 500 MG tablet"),
    "diabetes_plan": _Item("careplan", "SNOMED", "698360004", "Diabetes self management plan"),
    "foot_exam": _Item("procedure", "SNOMED", "401191002", "Foot examination"),
    # hypertension
    "bp_check": _Item("procedure", "SNOMED", "46973005", "Blood pressure taking"),
    "lisinopril": _Item("medication", "RXNORM", "314076", "Lisinopril 10 MG tablet"),
    "lifestyle_plan": _Item("careplan", "SNOMED", "443402002", "Lifestyle education"),
    # asthma
    "albuterol": _Item("medication", "RXNORM", "745679", "Albuterol inhaler"),
    "asthma_plan": _Item("careplan", "SNOMED", "699728000", "Asthma self management"),
    "spirometry": _Item("procedure", "SNOMED", "127783003", "Spirometry"),
    # wellness
    "flu_vaccine": _Item("immunization", "CVX", "140", "Influenza vaccine, seasonal"),
    "cervical_screening": _Item("procedure", "SNOMED", "171149006", "Cervical cancer screening"),
    "lipid_panel": _Item("lab", "LOINC", "57698-3", "Lipid panel"),
    "depression_screening": _Item("procedure", "SNOMED", "171207006", "Depression screening"),
}

_CONDITIONS = {
    "pregnancy": ("SNOMED", "72892002", "Normal pregnancy"),
    "diabetes": ("SNOMED", "44054006", "Diabetes mellitus type 2"),
    "hypertension": ("SNOMED", "59621000", "Essential hypertension"),
    "asthma": ("SNOMED", "195967001", "Asthma"),
}

_WEEK = pd.Timedelta(weeks=1)


def _plan_probabilities(program: str, week: float | None) -> dict[str, float]:
    """Item → probability that a plan written in this program contains it."""
    if program == "prenatal":
        assert week is not None
        p = {
            "antenatal_care": 0.95,
            "prenatal_vitamins": 0.7,
            "hemoglobin": 0.3,
            "urine_culture": 0.2,
        }
        if week < 14:
            p.update(ultrasound=0.8, hemoglobin=0.8, urine_culture=0.7)
        elif week < 28:
            p.update(glucose_tolerance=0.8 if week >= 22 else 0.3, ultrasound=0.3)
        else:
            p.update(tdap=0.6, gbs_test=0.7 if week >= 34 else 0.2, fetal_monitoring=0.8)
        return p
    if program == "postpartum":
        return {"postpartum_care": 0.95, "contraception": 0.8, "depression_screening": 0.7}
    if program == "diabetes":
        return {"hba1c": 0.9, "metformin": 0.8, "diabetes_plan": 0.6, "foot_exam": 0.4}
    if program == "hypertension":
        return {"bp_check": 0.9, "lisinopril": 0.8, "lifestyle_plan": 0.5}
    if program == "asthma":
        return {"albuterol": 0.9, "asthma_plan": 0.6, "spirometry": 0.3}
    if program == "wellness":
        return {
            "flu_vaccine": 0.7,
            "cervical_screening": 0.4,
            "lipid_panel": 0.5,
            "depression_screening": 0.5,
            "contraception": 0.3,
        }
    raise ValueError(f"unknown program {program!r}")


def _empty(name: str) -> pd.DataFrame:
    schema = TABLES[name]
    return pd.DataFrame({field.name: pd.Series([], dtype=object) for field in schema})


def synthetic_cohort(
    n_patients: int = 60,
    seed: int = 0,
    *,
    start: str = "2012-01-01",
    years: float = 6.0,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> dict[str, pd.DataFrame]:
    """Generate a synthetic cohort of women as canonical table frames.

    Args:
        n_patients: number of patients (at least 3, so that each split is non-empty).
        seed: seed of the generator; the same seed gives the same frames.
        start: first possible encounter date (UTC).
        years: length of each patient's observed timeline.
        split_fractions: train/validation/test shares of PATIENTS.

    Returns:
        ``{table name: DataFrame}`` for every table of ``pipelines.schemas.TABLES``
        (``notes`` and ``quarantine`` are empty), with the schema's columns.
    """
    if n_patients < 3:
        raise ValueError("n_patients must be at least 3 (one per split)")
    rng = np.random.default_rng(seed)
    origin = pd.Timestamp(start, tz="UTC")
    span = pd.Timedelta(days=365.25 * years)

    patients: list[dict[str, object]] = []
    encounters: list[dict[str, object]] = []
    events: list[dict[str, object]] = []
    plan_items: list[dict[str, object]] = []
    pregnancy_spans: dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]] = {}
    birth_dates: dict[str, pd.Timestamp] = {}

    for p in range(n_patients):
        pid = f"p{p:04d}"
        age0 = float(rng.uniform(18, 44))
        birth = (origin - pd.Timedelta(days=365.25 * age0)).normalize()
        birth_dates[pid] = birth
        patients.append(
            {
                "patient_id": pid,
                "birth_date": birth.date(),
                "sex": "F",
                "deceased_time": None,
                "race": str(rng.choice(["white", "black", "asian", "other"])),
                "ethnicity": str(rng.choice(["hispanic", "nonhispanic"])),
                "source": "synthetic",
                "source_file": None,
            }
        )
        # (time, program, week-of-pregnancy or None)
        visits: list[tuple[pd.Timestamp, str, float | None]] = []
        for year in range(int(np.ceil(years))):
            t = origin + pd.Timedelta(days=365.25 * year + float(rng.uniform(0, 300)))
            if t < origin + span:
                visits.append((t, "wellness", None))
        chronic: list[tuple[str, pd.Timestamp]] = []
        for cond, prob in (("diabetes", 0.25), ("hypertension", 0.3), ("asthma", 0.2)):
            if rng.random() < prob:
                onset = origin + pd.Timedelta(days=float(rng.uniform(0, 0.6)) * span.days)
                chronic.append((cond, onset))
                t = onset
                while t < origin + span:
                    visits.append((t, cond, None))
                    t = t + pd.Timedelta(days=float(rng.uniform(80, 120)))
        pregnancy_spans[pid] = []
        if rng.random() < 0.6 and age0 < 42:
            conception = origin + pd.Timedelta(days=float(rng.uniform(0, 0.55)) * span.days)
            due = conception + 40 * _WEEK
            pregnancy_spans[pid].append((conception, due))
            for weeks in range(8, 40, 4):
                jitter = pd.Timedelta(days=float(rng.uniform(-3, 3)))
                visits.append((conception + weeks * _WEEK + jitter, "prenatal", float(weeks)))
            for days_after in (10, 42):
                visits.append((due + pd.Timedelta(days=days_after), "postpartum", None))
            # the onset is back-dated: the pregnancy enters the record at the first visit
            events.append(
                _condition_event(
                    pid, "pregnancy", conception, due, len(events), recorded=conception + 8 * _WEEK
                )
            )
        for cond, onset in chronic:
            events.append(_condition_event(pid, cond, onset, None, len(events)))

        visits.sort(key=lambda v: v[0])
        previous_plan: list[str] = []
        last_start = origin - pd.Timedelta(days=365)
        for j, (t, program, week) in enumerate(visits):
            eid = f"{pid}-e{j:03d}"
            # at most one visit a day, so the next encounter starts after this one ends
            t = max(t.floor("min"), last_start + pd.Timedelta(days=1))
            last_start = t
            end = t + pd.Timedelta(minutes=30)
            encounters.append(
                {
                    "encounter_id": eid,
                    "patient_id": pid,
                    "start": t,
                    "end": end,
                    "class_code": "AMB",
                    "type_system": "SNOMED",
                    "type_code": {"prenatal": "424619006", "postpartum": "169762003"}.get(
                        program, "185349003"
                    ),
                    "type_display": {
                        "prenatal": "Prenatal visit",
                        "postpartum": "Postnatal visit",
                        "wellness": "General examination",
                    }.get(program, "Follow-up encounter"),
                    "reason_display": None,
                }
            )
            # vitals at every visit, and the previous plan's orders carried out now
            for code, display, value in (
                ("29463-7", "Body weight", float(rng.normal(68, 9))),
                ("8480-6", "Systolic blood pressure", float(rng.normal(122, 12))),
            ):
                events.append(
                    _event(pid, eid, t, "observation", "LOINC", code, display, len(events), value)
                )
            for name in previous_plan:
                if rng.random() < 0.8:
                    item = _ITEMS[name]
                    end_time = (
                        t + pd.Timedelta(days=90) if item.event_kind == "medication" else None
                    )
                    events.append(
                        _event(
                            pid,
                            eid,
                            t,
                            item.event_kind,
                            item.system,
                            item.code,
                            item.display,
                            len(events),
                            end_time=end_time,
                        )
                    )
            probs = _plan_probabilities(program, week)
            # active chronic programs leak into every plan a little
            for cond, onset in chronic:
                if onset <= t and program != cond:
                    for name, prob in _plan_probabilities(cond, None).items():
                        probs[name] = max(probs.get(name, 0.0), 0.25 * prob)
            plan = [name for name in sorted(probs) if rng.random() < probs[name]]
            for position, name in enumerate(plan):
                item = _ITEMS[name]
                plan_items.append(
                    {
                        "encounter_id": eid,
                        "patient_id": pid,
                        "position": position,
                        "kind": item.kind,
                        "item_key": item.key,
                        "code_system": item.system,
                        "code": item.code,
                        "display": item.display,
                    }
                )
            previous_plan = plan

    frames = {
        "patients": pd.DataFrame(patients),
        "encounters": pd.DataFrame(encounters),
        "events": pd.DataFrame(events),
        "plan_items": pd.DataFrame(plan_items),
    }
    frames["reference_plans"] = _reference_plans(frames["plan_items"], frames["encounters"])
    frames["index_encounters"] = _index_encounters(
        frames["encounters"],
        frames["plan_items"],
        birth_dates,
        pregnancy_spans,
        rng,
        split_fractions,
    )
    frames["notes"] = _empty("notes")
    frames["quarantine"] = _empty("quarantine")
    for name, frame in frames.items():
        frame = frame[TABLES[name].names].copy()
        for field in TABLES[name]:
            if pa.types.is_timestamp(field.type):
                frame[field.name] = (
                    pd.to_datetime(frame[field.name], utc=True).dt.floor("s").dt.as_unit("us")
                )
        frames[name] = frame
    return frames


def _event(
    pid: str,
    eid: str | None,
    t: pd.Timestamp,
    kind: str,
    system: str,
    code: str,
    display: str,
    n: int,
    value: float | None = None,
    end_time: pd.Timestamp | None = None,
    recorded_time: pd.Timestamp | None = None,
) -> dict[str, object]:
    return {
        "event_id": f"ev{n:07d}",
        "patient_id": pid,
        "encounter_id": eid,
        "time": t,
        "recorded_time": t if recorded_time is None else recorded_time,
        "end_time": end_time,
        "kind": kind,
        "code_system": system,
        "code": code,
        "display": display,
        "value": value,
        "value_text": None,
        "unit": "kg" if code == "29463-7" else ("mm[Hg]" if code == "8480-6" else None),
        "codings": None,
    }


def _condition_event(
    pid: str,
    cond: str,
    onset: pd.Timestamp,
    end: pd.Timestamp | None,
    n: int,
    recorded: pd.Timestamp | None = None,
) -> dict[str, object]:
    system, code, display = _CONDITIONS[cond]
    return _event(
        pid,
        None,
        onset.floor("min"),
        "condition",
        system,
        code,
        display,
        n,
        end_time=end,
        recorded_time=None if recorded is None else recorded.floor("min"),
    )


def _reference_plans(plan_items: pd.DataFrame, encounters: pd.DataFrame) -> pd.DataFrame:
    grouped = plan_items.groupby("encounter_id", sort=True)
    plans = pd.DataFrame(
        {
            "plan_text": grouped["display"].agg(lambda s: "; ".join(s)),
            "n_items": grouped.size().astype("int32"),
        }
    ).reset_index()
    plans = plans.merge(
        encounters[["encounter_id", "patient_id", "start"]], on="encounter_id", how="left"
    ).rename(columns={"start": "time"})
    plans["plan_source"] = "events"
    return plans


def _index_encounters(
    encounters: pd.DataFrame,
    plan_items: pd.DataFrame,
    birth_dates: dict[str, pd.Timestamp],
    pregnancy_spans: dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]],
    rng: np.random.Generator,
    split_fractions: tuple[float, float, float],
) -> pd.DataFrame:
    enc = encounters.sort_values(["patient_id", "start", "encounter_id"]).reset_index(drop=True)
    n_items = plan_items.groupby("encounter_id").size()
    enc["next_encounter_id"] = enc.groupby("patient_id")["encounter_id"].shift(-1)
    enc["next_time"] = enc.groupby("patient_id")["start"].shift(-1)
    enc["n_plan_items"] = enc["next_encounter_id"].map(n_items).fillna(0).astype("int32")
    idx = enc[enc["next_encounter_id"].notna() & (enc["n_plan_items"] > 0)].copy()
    idx["index_time"] = idx["end"]
    idx["age_years"] = [
        (t - birth_dates[p]).days / 365.25
        for p, t in zip(idx["patient_id"], idx["index_time"], strict=True)
    ]
    idx["is_adult"] = idx["age_years"] >= 18
    idx["is_obstetric"] = [
        any(a <= t <= b + pd.Timedelta(days=42) for a, b in pregnancy_spans[p])
        for p, t in zip(idx["patient_id"], idx["index_time"], strict=True)
    ]
    patients = np.array(sorted(enc["patient_id"].unique()))
    rng.shuffle(patients)
    n = len(patients)
    n_val = max(1, round(split_fractions[1] * n))
    n_test = max(1, round(split_fractions[2] * n))
    split = {p: "validation" for p in patients[:n_val]}
    split.update({p: "test" for p in patients[n_val : n_val + n_test]})
    idx["split"] = idx["patient_id"].map(split).fillna("train")
    return idx.reset_index(drop=True)
