"""The matching threshold of `PlanScorer`, chosen on VALIDATION patients.

The LLM answers oracle prompts (each told its own next-plan items); each answer
is then scored against the items of another patient's plan that its own plan
lacks (negatives), and the cut is the lowest at which at most
``max_false_match`` of those count as covered (`promptenv.reward.choose_threshold`).
The share of told items the answers cover at that cut is recorded with it.

`calibrated_scorer` is the one way training, evaluation and the main job get
their scorer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from promptenv.encounters import EVAL_PARAMS, EvalSettings, pick_encounters, references
from promptenv.llm import GenerationParams, GenerationRequest, LLMClient
from promptenv.prompts import INITIAL_CONFIG, oracle
from promptenv.reward import DEFAULT_THRESHOLD, PlanScorer, Reference, choose_threshold

Progress = Callable[[str], None]


def calibration_encounters(index: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """The validation encounters that choose the threshold: ``n // 2`` obstetric, ``n // 2`` adult."""
    return pick_encounters(
        index, EvalSettings(split="validation", n_obstetric=n // 2, n_adult=n // 2, seed=seed)
    )


def calibrate_threshold(
    client: LLMClient,
    validation: pd.DataFrame,
    refs: Mapping[str, Reference],
    scorer: PlanScorer,
    params: GenerationParams = EVAL_PARAMS,
    concurrency: int = 2,
    max_false_match: float = 0.05,
) -> dict[str, Any]:
    """Choose the matching threshold on validation encounters (see the module docstring)."""
    rows = validation.reset_index(drop=True)
    if len(rows) < 2:
        return {
            "threshold": DEFAULT_THRESHOLD,
            "chosen_on": "default (fewer than 2 validation encounters)",
        }
    prompts = [oracle(refs[e].items, INITIAL_CONFIG.max_tokens) for e in rows["encounter_id"]]
    answers = [
        c.text
        for c in client.generate_many(
            [GenerationRequest(p.system, p.user, params) for p in prompts],
            concurrency=concurrency,
        )
    ]
    positive: list[float] = []
    negative: list[float] = []
    for i, eid in enumerate(rows["encounter_id"]):
        items = refs[eid].items
        # another patient's answer: the next row whose patient differs
        j = next(
            (
                j
                for j in range(1, len(rows))
                if rows["patient_id"][(i + j) % len(rows)] != rows["patient_id"][i]
            ),
            None,
        )
        if not items or j is None:
            continue
        own = scorer.similarity(answers[i], items)
        other = scorer.similarity(answers[(i + j) % len(rows)], items)
        positive.extend(own.max(axis=1) if own.size else np.zeros(len(items)))
        negative.extend(other.max(axis=1) if other.size else np.zeros(len(items)))
    if not positive or not negative:
        return {
            "threshold": DEFAULT_THRESHOLD,
            "chosen_on": "default (no usable validation answers)",
        }
    threshold = choose_threshold(positive, negative, max_false_match)
    return {
        "threshold": round(threshold, 4),
        "chosen_on": f"{len(rows)} validation encounters: at most {max_false_match:.0%} of items "
        "absent from an answer's plan match it",
        "covered_when_told": round(float((np.asarray(positive) >= threshold).mean()), 4),
        "positive_mean": round(float(np.mean(positive)), 4),
        "negative_mean": round(float(np.mean(negative)), 4),
        "llm_calls": len(prompts),
    }


def calibrated_scorer(
    client: LLMClient,
    tables: Mapping[str, pd.DataFrame],
    n_encounters: int = 20,
    *,
    seed: int = 0,
    params: GenerationParams = EVAL_PARAMS,
    concurrency: int = 2,
    max_false_match: float = 0.05,
    progress: Progress | None = None,
) -> tuple[PlanScorer, dict[str, Any]]:
    """A `PlanScorer` whose threshold ``client``'s answers chose on ``n_encounters`` validation
    encounters (seeded), and what the calibration found."""
    rows = calibration_encounters(tables["index_encounters"], n_encounters, seed)
    if progress:
        progress(f"calibrating the matching threshold on {len(rows)} validation encounters")
    scorer = PlanScorer()
    calibration = calibrate_threshold(
        client, rows, references(tables, rows), scorer, params, concurrency, max_false_match
    )
    scorer.threshold = float(calibration["threshold"])
    return scorer, calibration


__all__ = ["calibrate_threshold", "calibrated_scorer", "calibration_encounters"]
