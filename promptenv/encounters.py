"""Which index encounters an evaluation (or a calibration) uses, and the plans they are scored on.

`pick_encounters` draws, from one split, the obstetric subset and a sample of
adult encounters (seeded, at most ``max_per_patient`` per patient);
`references` gives each chosen encounter the physician's next plan
(`promptenv.reward.Reference`). The comparison harness (`promptenv.evaluate`),
the threshold calibration (`promptenv.calibration`) and policy training all
choose their encounters here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from promptenv.llm import GenerationParams
from promptenv.reward import Reference

#: Generation settings of every evaluation call (cached by the client).
EVAL_PARAMS = GenerationParams(max_tokens=128, temperature=0.0, seed=0)
#: Validation encounters that choose the matching threshold (`promptenv.calibration`).
CALIBRATION_ENCOUNTERS = 20


@dataclass(frozen=True)
class EvalSettings:
    """Which encounters, how many, and how the answers are generated and scored."""

    n_obstetric: int = 40
    n_adult: int = 40
    split: str = "test"
    seed: int = 0
    max_per_patient: int = 3
    params: GenerationParams = field(default_factory=lambda: EVAL_PARAMS)
    concurrency: int = 2
    bootstrap: int = 1000
    n_calibration: int = CALIBRATION_ENCOUNTERS
    max_false_match: float = 0.05
    #: where one subset has fewer encounters than asked (a cohort of men has no obstetric
    #: one), the other makes up the difference
    make_up: bool = False


def pick_encounters(index: pd.DataFrame, settings: EvalSettings) -> pd.DataFrame:
    """Index encounters of ``settings.split`` in both subsets: at most ``max_per_patient`` per
    patient, seeded; with ``make_up``, one subset's shortfall is taken from the other (the
    samples are seeded prefixes, so the encounters chosen without it stay chosen).

    Returns the chosen rows of ``index_encounters`` with boolean columns
    ``in_obstetric`` and ``in_adult`` (an encounter may be in both).
    """
    chosen = _pick(index, settings)
    if settings.make_up:
        short_obstetric = settings.n_obstetric - int(chosen["in_obstetric"].sum())
        short_adult = settings.n_adult - int(chosen["in_adult"].sum())
        if short_obstetric > 0 or short_adult > 0:
            more = replace(
                settings,
                n_obstetric=settings.n_obstetric + max(short_adult, 0),
                n_adult=settings.n_adult + max(short_obstetric, 0),
            )
            chosen = _pick(index, more)
    return chosen


def _pick(index: pd.DataFrame, settings: EvalSettings) -> pd.DataFrame:
    pool = index[index["split"] == settings.split]
    rng = np.random.default_rng(settings.seed)

    def sample(frame: pd.DataFrame, n: int) -> pd.DataFrame:
        shuffled = frame.iloc[rng.permutation(len(frame))]
        capped = shuffled[shuffled.groupby("patient_id").cumcount() < settings.max_per_patient]
        return capped.head(n)

    ob = sample(pool[pool["is_obstetric"]], settings.n_obstetric)
    ad = sample(pool[pool["is_adult"]], settings.n_adult)
    chosen = pd.concat([ob, ad]).drop_duplicates("encounter_id")
    chosen = chosen.assign(
        in_obstetric=chosen["encounter_id"].isin(ob["encounter_id"]),
        in_adult=chosen["encounter_id"].isin(ad["encounter_id"]),
    )
    return chosen.sort_values(["patient_id", "index_time"]).reset_index(drop=True)


def references(tables: Mapping[str, pd.DataFrame], chosen: pd.DataFrame) -> dict[str, Reference]:
    """For each chosen index encounter: the items and text of its next encounter's plan."""
    items = tables["plan_items"]
    plans = tables["reference_plans"].set_index("encounter_id")["plan_text"]
    wanted = set(chosen["next_encounter_id"])
    by_enc = items[items["encounter_id"].isin(wanted)].sort_values(["encounter_id", "position"])
    grouped = by_enc.groupby("encounter_id")["display"].apply(list).to_dict()
    return {
        row.encounter_id: Reference(
            tuple(grouped.get(row.next_encounter_id, [])),
            str(plans.get(row.next_encounter_id, "")),
        )
        for row in chosen.itertuples(index=False)
    }


__all__ = [
    "CALIBRATION_ENCOUNTERS",
    "EVAL_PARAMS",
    "EvalSettings",
    "Reference",
    "pick_encounters",
    "references",
]
