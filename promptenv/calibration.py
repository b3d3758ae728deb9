"""The matching threshold of `PlanScorer`, chosen on VALIDATION patients.

The LLM answers oracle prompts (each told its own next-plan items); each answer
is then scored against the items of another patient's plan that its own plan
lacks (negatives), and the cut is the lowest at which at most
``max_false_match`` of those count as covered (`promptenv.reward.choose_threshold`).
The share of told items the answers cover at that cut is recorded with it.

`calibrated_scorer` calibrates; `workspace_calibration` does it once per
workspace and LLM and stores the result, with its provenance, in
``models/calibration/``: training, evaluation and the main job all read it
and calibrate again only when the LLM, its generation settings, the number of
encounters, the seed or the calibration encounters' plans changed
(`Calibration.fingerprint`).

How many encounters: `CALIBRATION_ENCOUNTERS` (20: 10 obstetric, 10 adult
validation encounters of 9 patients on the default cohort; one subset's shortfall
is made up by the other). With the local
SmolLM2 the threshold's sd over five sample seeds was 0.025 on 20 encounters and
0.033 on 40: more encounters of the same 19 validation patients do not steady
it, and 20 cost half the calls (docs/policy.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.workspace import Workspace, atomic_write_bytes
from promptenv.encounters import (
    CALIBRATION_ENCOUNTERS,
    EVAL_PARAMS,
    EvalSettings,
    pick_encounters,
    references,
)
from promptenv.llm import GenerationParams, GenerationRequest, LLMClient
from promptenv.prompts import INITIAL_CONFIG, oracle
from promptenv.reward import DEFAULT_THRESHOLD, PlanScorer, Reference, choose_threshold
from recsys.type_aliases import Progress

#: The seed of their sample: the same for training, evaluation and the main job.
CALIBRATION_SEED = 0
#: Bumped when the calibration method changes: stored calibrations are then redone.
CALIBRATION_VERSION = 2


@dataclass(frozen=True)
class Calibration:
    """A chosen threshold, what it was chosen on, and its provenance."""

    threshold: float
    chosen_on: str
    #: share of told items the oracle answers cover at the cut (None for the default cut)
    covered_when_told: float | None = None
    positive_mean: float | None = None
    negative_mean: float | None = None
    #: oracle answers asked for (from the LLM or its cache)
    llm_calls: int = 0
    llm: str = ""
    n_encounters: int = 0
    encounters: tuple[str, ...] = ()
    seed: int = CALIBRATION_SEED
    max_false_match: float = 0.05
    #: sha256 prefix of everything the threshold depends on (see `calibration_fingerprint`)
    fingerprint: str = ""
    #: when it was calibrated (UTC, ISO 8601)
    when: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["encounters"] = list(self.encounters)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        known["encounters"] = tuple(known.get("encounters", ()))
        return cls(**known)

    def scorer(self) -> PlanScorer:
        """A `PlanScorer` with this threshold."""
        return PlanScorer(threshold=self.threshold)


def calibration_encounters(index: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """The validation encounters that choose the threshold: ``n // 2`` obstetric, ``n // 2``
    adult, and where one subset has fewer (a cohort of men has no obstetric encounter), the
    other makes up the difference."""
    half = n // 2
    return pick_encounters(
        index,
        EvalSettings(split="validation", n_obstetric=half, n_adult=half, seed=seed, make_up=True),
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
        k = (i + j) % len(rows)
        own = scorer.similarity(answers[i], items)
        positive.extend(own.max(axis=1) if own.size else np.zeros(len(items)))
        # an item both plans hold is a true match of the other answer, not a false one
        lacking = [it for it in items if it not in set(refs[rows["encounter_id"][k]].items)]
        other = scorer.similarity(answers[k], lacking)
        negative.extend(other.max(axis=1) if other.size else np.zeros(len(lacking)))
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


def calibration_fingerprint(
    llm: str,
    params: GenerationParams,
    rows: pd.DataFrame,
    refs: Mapping[str, Reference],
    seed: int,
    max_false_match: float,
) -> str:
    """A hash of what the threshold depends on: the LLM and its settings, the method, and the
    calibration encounters with their patients and next-plan items (the oracle prompts)."""
    record = {
        "version": CALIBRATION_VERSION,
        "llm": llm,
        "params": asdict(params),
        "seed": seed,
        "max_false_match": max_false_match,
        "encounters": [
            [e, str(p), list(refs[e].items)]
            for e, p in zip(rows["encounter_id"], rows["patient_id"], strict=True)
        ],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe(rows: pd.DataFrame, asked: int) -> str:
    """The calibration encounters in words: how many, of which subsets and patients, and
    why fewer than ``asked`` when the validation split holds no more."""
    ob, ad = int(rows["in_obstetric"].sum()), int(rows["in_adult"].sum())
    text = (
        f"{len(rows)} validation encounters ({ob} obstetric, {ad} adult; "
        f"{rows['patient_id'].nunique()} patients)"
    )
    if ob + ad < 2 * (asked // 2):
        text += (
            f": {asked} were asked, and the validation split has no more at "
            f"{EvalSettings().max_per_patient} per patient"
        )
    return text


def calibrated_scorer(
    client: LLMClient,
    tables: Mapping[str, pd.DataFrame],
    n_encounters: int = CALIBRATION_ENCOUNTERS,
    *,
    seed: int = CALIBRATION_SEED,
    params: GenerationParams = EVAL_PARAMS,
    concurrency: int = 2,
    max_false_match: float = 0.05,
    progress: Progress | None = None,
) -> tuple[PlanScorer, Calibration]:
    """A `PlanScorer` whose threshold ``client``'s answers chose on ``n_encounters`` validation
    encounters (seeded), and the `Calibration` that says so."""
    rows = calibration_encounters(tables["index_encounters"], n_encounters, seed)
    refs = references(tables, rows)
    if progress:
        progress(f"calibrating the matching threshold on {describe(rows, n_encounters)}")
    scorer = PlanScorer()
    found = calibrate_threshold(client, rows, refs, scorer, params, concurrency, max_false_match)
    calibration = Calibration(
        **found,
        llm=client.label,
        n_encounters=n_encounters,
        encounters=tuple(rows["encounter_id"]),
        seed=seed,
        max_false_match=max_false_match,
        fingerprint=calibration_fingerprint(
            client.label, params, rows, refs, seed, max_false_match
        ),
        when=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    scorer.threshold = calibration.threshold
    return scorer, calibration


def calibration_path(workspace: Workspace, llm: str) -> Path:
    """Where the workspace keeps the calibration for the LLM labelled ``llm``."""
    slug = hashlib.sha256(llm.encode()).hexdigest()[:12]
    return workspace.models_dir / "calibration" / f"{slug}.json"


def read_calibration(path: Path) -> Calibration | None:
    """The calibration stored at ``path``; None when there is none."""
    if not path.exists():
        return None
    try:
        return Calibration.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{path} is not a calibration ({exc}): delete it and the next run calibrates again"
        ) from exc


def workspace_calibration(
    workspace: Workspace,
    client: LLMClient,
    tables: Mapping[str, pd.DataFrame],
    n_encounters: int = CALIBRATION_ENCOUNTERS,
    *,
    params: GenerationParams = EVAL_PARAMS,
    concurrency: int = 2,
    max_false_match: float = 0.05,
    progress: Progress | None = None,
) -> Calibration:
    """The workspace's calibration for ``client``'s LLM: the stored one when nothing it depends
    on changed, else a new one (`calibrated_scorer`, seed `CALIBRATION_SEED`), stored."""
    say = progress or (lambda _m: None)
    path = calibration_path(workspace, client.label)
    stored = read_calibration(path)
    rows = calibration_encounters(tables["index_encounters"], n_encounters, CALIBRATION_SEED)
    wanted = calibration_fingerprint(
        client.label, params, rows, references(tables, rows), CALIBRATION_SEED, max_false_match
    )
    if stored is not None and stored.fingerprint == wanted:
        say(
            f"matching threshold {stored.threshold} (calibrated on {len(stored.encounters)} "
            f"validation encounters at {stored.when}; {path})"
        )
        return stored
    if stored is not None:
        say(f"the LLM, its settings or the validation plans changed since {stored.when}")
    _, calibration = calibrated_scorer(
        client,
        tables,
        n_encounters,
        seed=CALIBRATION_SEED,
        params=params,
        concurrency=concurrency,
        max_false_match=max_false_match,
        progress=say,
    )
    atomic_write_bytes(path, json.dumps(calibration.to_json(), indent=2).encode())
    say(f"matching threshold {calibration.threshold} → {path}")
    return calibration


def evaluation_calibration(
    client: LLMClient,
    tables: Mapping[str, pd.DataFrame],
    settings: EvalSettings,
    workspace: Workspace | None = None,
    progress: Progress | None = None,
) -> Calibration:
    """The calibration an evaluation with ``settings`` scores with: the workspace's
    (`workspace_calibration`) when there is a workspace, else a new one."""
    options: dict[str, Any] = {
        "params": settings.params,
        "concurrency": settings.concurrency,
        "max_false_match": settings.max_false_match,
        "progress": progress,
    }
    if workspace is not None:
        return workspace_calibration(workspace, client, tables, settings.n_calibration, **options)
    return calibrated_scorer(client, tables, settings.n_calibration, **options)[1]


__all__ = [
    "CALIBRATION_ENCOUNTERS",
    "CALIBRATION_SEED",
    "Calibration",
    "calibrate_threshold",
    "calibrated_scorer",
    "calibration_encounters",
    "calibration_fingerprint",
    "calibration_path",
    "evaluation_calibration",
    "read_calibration",
    "workspace_calibration",
]
