"""Methods that choose a prompt config per patient by edits, compared in `pmlm evaluate`.

Each is an `EditMethod`: given the evaluation's cases and its `AnswerReward`
(the evaluation's LLM and calibrated scorer), it returns one `EditChoice` per
case: the final config, the edit trace, and the LLM calls it spent to choose.

- `PolicyEdits` ("pmlm"): the trained policy; no LLM call.
- `RandomEdits` ("random_edits"): the same number of uniformly drawn valid
  edits as the policy made for that case, from the policy's start config (or a
  fixed number from the initial config); no LLM call.
- `PerPatientSearch` ("search_N"): black-box random search with N LLM calls per
  patient: the start config and N − 1 random edit sequences of it (1 to
  ``max_edits`` edits, seeded per encounter) are each answered and scored
  against THIS patient's physician plan; the best is kept. It therefore sees
  the reference it is scored on: an optimistic, expensive comparison point (the
  cost a per-patient optimiser pays), not a deployable method. Search with 4
  calls tries the first 4 of the 16 candidates of search with 16 calls. The
  start config is the policy's (the best fixed config on validation) when the
  evaluation has a policy, as for `RandomEdits`, else the initial config: the
  search and the policy then edit the same prompt, and the search is never worse
  than that prompt on the plan it scores against.
- The same search scored against the patient's **last plan known at the index
  time** ("search_last_N"): what a per-patient optimiser can do in deployment,
  where the next plan is not written yet. Same candidates, so the same answers
  (the cache serves them); a patient with no earlier plan keeps the start
  config and spends no call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from promptenv.editing import EditCase, random_edits
from promptenv.env import AnswerReward, EditChoice, EditMethod
from promptenv.policy import Policy
from promptenv.prompts import INITIAL_CONFIG, PromptConfig


def case_seed(encounter_id: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{encounter_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class PolicyEdits:
    policy: Policy

    def __call__(self, cases: Sequence[EditCase], reward: AnswerReward) -> list[EditChoice]:
        return [
            EditChoice(cfg, tuple(trace), 0, {"policy": self.policy.version})
            for cfg, trace in self.policy.edit_many(cases)
        ]


@dataclass(frozen=True)
class RandomEdits:
    """Random valid edits: as many as ``like`` (a policy) made for the case, from the same start
    config, else ``n_edits`` from the initial config."""

    n_edits: int = 3
    like: Policy | None = None
    seed: int = 0

    def __call__(self, cases: Sequence[EditCase], reward: AnswerReward) -> list[EditChoice]:
        counts = (
            [len(t) for _, t in self.like.edit_many(cases)]
            if self.like is not None
            else [self.n_edits] * len(cases)
        )
        start = self.like.start if self.like is not None else INITIAL_CONFIG
        out = []
        for case, n in zip(cases, counts, strict=True):
            rng = np.random.default_rng(case_seed(case.encounter_id, self.seed))
            cfg, trace = random_edits(start, n, rng)
            out.append(EditChoice(cfg, tuple(trace), 0))
        return out


def known_plans(case: EditCase) -> pd.DataFrame:
    """The patient's plans with items recorded at or before the case's index time (its
    context), oldest first."""
    plans = case.context.reference_plans
    return plans[plans["n_items"] > 0].sort_values(["time", "encounter_id"])


def last_known_plan(case: EditCase) -> tuple[tuple[str, ...], str] | None:
    """(item displays, plan text) of the latest plan with items recorded at or before
    the case's index time (its context), or None when there is none."""
    plans = known_plans(case)
    if plans.empty:
        return None
    last = plans.iloc[-1]
    items = case.context.plan_items
    items = items[items["encounter_id"] == last["encounter_id"]]
    return tuple(items.sort_values("position")["display"]), str(last["plan_text"])


#: What per-patient search scores its candidates against.
SEARCH_TARGETS = ("next_plan", "last_plan")


@dataclass(frozen=True)
class PerPatientSearch:
    """Random search over edit sequences with ``n_calls`` LLM answers per patient (see module doc).

    ``target``: ``"next_plan"`` scores against the plan the case is evaluated on
    (optimistic); ``"last_plan"`` against the last plan known at the index time.
    ``start``: the config tried first and edited by every other candidate.
    """

    n_calls: int
    max_edits: int = 6
    seed: int = 0
    concurrency: int = 1
    target: str = "next_plan"
    start: PromptConfig = INITIAL_CONFIG

    def __post_init__(self) -> None:
        if self.target not in SEARCH_TARGETS:
            raise ValueError(f"search target must be one of {SEARCH_TARGETS}, not {self.target!r}")

    def scored_case(self, case: EditCase) -> EditCase | None:
        """The case as the search scores it: with the target plan as its reference."""
        if self.target == "next_plan":
            return case
        known = last_known_plan(case)
        if known is None:
            return None
        items, text = known
        # its own encounter key: scores against another plan must not share the memo
        return replace(
            case,
            encounter_id=f"{case.encounter_id}#last_plan",
            reference_items=items,
            plan_text=text,
        )

    def candidates(self, case: EditCase) -> list[tuple[PromptConfig, tuple[str, ...]]]:
        rng = np.random.default_rng(case_seed(case.encounter_id, self.seed + 1))
        out: list[tuple[PromptConfig, tuple[str, ...]]] = [(self.start, ())]
        seen = {self.start}
        attempts = 0
        while len(out) < self.n_calls and attempts < 50 * self.n_calls:
            attempts += 1
            n = int(rng.integers(1, self.max_edits + 1))
            cfg, trace = random_edits(self.start, n, rng)
            if cfg not in seen:
                seen.add(cfg)
                out.append((cfg, tuple(trace)))
        return out

    def __call__(self, cases: Sequence[EditCase], reward: AnswerReward) -> list[EditChoice]:
        scored = [self.scored_case(c) for c in cases]
        plans = [
            self.candidates(c) if sc is not None else []
            for c, sc in zip(cases, scored, strict=True)
        ]
        pairs = [
            (sc, cfg)
            for sc, cands in zip(scored, plans, strict=True)
            if sc is not None
            for cfg, _ in cands
        ]
        answered = iter(reward.answer_many(pairs, concurrency=self.concurrency))
        out = []
        for cands in plans:
            if not cands:  # nothing to score against: the start config, no call
                out.append(EditChoice(self.start, (), 0, {"search_target": "none"}))
                continue
            rewards = [next(answered).score.reward for _ in cands]
            best = int(np.argmax(rewards))
            cfg, trace = cands[best]
            out.append(
                EditChoice(
                    cfg,
                    trace,
                    len(cands),
                    {
                        "search_best_reward": rewards[best],
                        "search_candidates": len(cands),
                        "search_target": self.target,
                    },
                )
            )
        return out


EDIT_METHODS = ("pmlm", "random_edits", "search_4", "search_16", "search_last_16")


def _search_spec(name: str) -> tuple[str, int] | None:
    """``search_N`` → ("next_plan", N); ``search_last_N`` → ("last_plan", N); else None."""
    for prefix, target in (("search_last_", "last_plan"), ("search_", "next_plan")):
        if name.startswith(prefix):
            n = name[len(prefix) :]
            return (target, int(n)) if n.isdigit() and int(n) >= 1 else None
    return None


def is_edit_method(name: str) -> bool:
    """``pmlm``, ``random_edits``, ``search_N`` or ``search_last_N`` (N ≥ 1 LLM calls per patient)."""
    return name in ("pmlm", "random_edits") or _search_spec(name) is not None


def edit_methods(
    names: Sequence[str], policy: Policy | None, max_edits: int = 6, seed: int = 0
) -> dict[str, EditMethod]:
    """The edit methods ``names`` (see `is_edit_method`); ``pmlm`` needs a policy.

    ``random_edits`` makes as many edits per case as the policy does when there
    is one, else 3; search draws up to ``max_edits`` edits per candidate. Both
    edit the policy's start config when there is a policy, else the initial config.
    """
    out: dict[str, EditMethod] = {}
    for name in names:
        if not is_edit_method(name):
            raise ValueError(
                f"{name!r} is not an edit method (pmlm, random_edits, search_N, search_last_N)"
            )
        if name == "pmlm":
            if policy is None:
                raise ValueError("method pmlm needs a trained policy: run `pmlm policy train`")
            out[name] = PolicyEdits(policy)
        elif name == "random_edits":
            out[name] = RandomEdits(like=policy, seed=seed)
        elif (spec := _search_spec(name)) is not None:
            target, n = spec
            out[name] = PerPatientSearch(
                n,
                policy.max_edits if policy else max_edits,
                seed=seed,
                target=target,
                start=policy.start if policy else INITIAL_CONFIG,
            )
    return out


__all__ = [
    "EDIT_METHODS",
    "EditChoice",
    "EditMethod",
    "PerPatientSearch",
    "PolicyEdits",
    "RandomEdits",
    "case_seed",
    "edit_methods",
    "is_edit_method",
    "known_plans",
    "last_known_plan",
]
