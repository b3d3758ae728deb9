"""The comparison harness: every method, the same test encounters, the same LLM.

``evaluate_methods`` picks test index encounters (the obstetric subset and a
sample of adult encounters, seeded), builds each method's prompt, asks the LLM
through the cached client, scores each answer against the next encounter's plan
and aggregates: means with bootstrap 95% confidence intervals, the gap closed
((method − general) / (oracle − general)), LLM calls and tokens.

The matching threshold is chosen on VALIDATION patients
(`promptenv.calibration.calibrated_scorer`) and recorded with the results.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipelines.index import ContextStore
from promptenv.calibration import Calibration, evaluation_calibration
from promptenv.editing import build_cases
from promptenv.encounters import EVAL_PARAMS, EvalSettings, pick_encounters, references
from promptenv.env import AnswerReward, EditMethod
from promptenv.fragments import PatientSignals
from promptenv.judge import PlanJudge
from promptenv.llm import GenerationRequest, LLMClient
from promptenv.llm.client import progress_lines
from promptenv.prompts import (
    INITIAL_CONFIG,
    METHODS,
    Prompt,
    PromptConfig,
    assemble,
    method_prompt,
)
from promptenv.reward import Reference
from recsys.type_aliases import Progress

#: Table order: the prompt methods, then the edit methods of `promptenv.search`.
METHOD_ORDER = (
    *METHODS,
    "random_edits",
    "pmlm",
    "search_last_4",
    "search_last_16",
    "search_4",
    "search_16",
)
SUBSETS = ("obstetric", "adult")
#: The least oracle − general recall over which a gap closed is shown.
MIN_GAP = 0.05


def build_prompts(
    store: ContextStore,
    chosen: pd.DataFrame,
    signals: Mapping[str, PatientSignals],
    refs: Mapping[str, Reference],
    methods: Sequence[str],
    config: PromptConfig = INITIAL_CONFIG,
) -> list[tuple[str, Prompt]]:
    """(encounter_id, prompt) for every chosen encounter and method."""
    out = []
    for eid in chosen["encounter_id"]:
        ctx = store.context(eid)
        sig = signals.get(eid, PatientSignals())
        for method in methods:
            out.append((eid, method_prompt(method, ctx, sig, refs[eid].items, config)))
    return out


def bootstrap_ci(values: np.ndarray, reps: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean over ``reps`` resamples."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(reps, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def aggregate(results: pd.DataFrame, settings: EvalSettings) -> pd.DataFrame:
    """Per subset and method: means with 95% CIs, gap closed, calls and tokens."""
    rows = []
    # the LLM-as-judge score, when a judge graded anything (NaN: unparsed or not judged)
    judged = "judge" in results and bool(results["judge"].notna().any())
    for subset in SUBSETS:
        sub = results[results[f"in_{subset}"]]
        if sub.empty:
            continue
        means = sub.groupby("method")["recall"].mean()
        general, oracle = means.get("general", np.nan), means.get("oracle", np.nan)
        for method, g in sub.groupby("method", sort=False):
            row: dict[str, Any] = {"subset": subset, "method": method, "n": len(g)}
            for metric in ("recall", "precision", "rouge_l", "reward"):
                vals = g[metric].to_numpy(dtype=float)
                lo, hi = bootstrap_ci(vals, settings.bootstrap, settings.seed)
                row[metric] = vals.mean()
                row[f"{metric}_lo"], row[f"{metric}_hi"] = lo, hi
            if judged:
                vals = g["judge"].dropna().to_numpy(dtype=float)
                row["judge"] = vals.mean() if len(vals) else np.nan
                row["judge_lo"], row["judge_hi"] = bootstrap_ci(
                    vals, settings.bootstrap, settings.seed
                )
                row["judge_n"] = len(vals)
            row["words"] = g["words"].mean()
            row["gap_closed"] = (
                (row["recall"] - general) / (oracle - general)
                if has_gap(oracle, general)
                else np.nan
            )
            row["prompt_tokens"] = g["prompt_tokens"].mean()
            row["llm_calls_per_patient"] = g["llm_calls"].mean()
            row["input_tokens"] = int(g["input_tokens"].sum())
            row["output_tokens"] = int(g["output_tokens"].sum())
            rows.append(row)
    table = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return table.sort_values(
        ["subset", "method"],
        key=lambda s: s.map(lambda m: order.get(m, len(order))) if s.name == "method" else s,
        kind="stable",
    ).reset_index(drop=True)


def has_gap(oracle: float, general: float) -> bool:
    """Whether the oracle is at least `MIN_GAP` above general, so that a gap closed is a share
    of something (a gap of 0.02 made a recall of 0.29 read as 13.00); False when either is NaN."""
    return bool(oracle - general >= MIN_GAP)


def gap_note(table: pd.DataFrame) -> str:
    """Sentences on where the gap closed is no share of a gap; "" when it is one everywhere.

    Per subset: where the oracle is less than `MIN_GAP` above general, the gap closed is
    left out (a ratio over almost nothing); where it is shown, the methods whose mean
    recall is above the oracle's are named (the oracle is told the plan, but a small LLM
    does not always repeat it, so it is no ceiling there and their gap closed, above 1, is
    no share of a gap)."""
    if table.empty or not {"oracle", "general"} <= set(table["method"]):
        return ""
    no_gap, above_parts = [], []
    for subset, sub in table.groupby("subset", sort=False):
        recall = sub.set_index("method")["recall"]
        if "oracle" not in recall or "general" not in recall:
            continue
        if not has_gap(recall["oracle"], recall["general"]):
            no_gap.append(str(subset))
            continue
        above = sub[(sub["method"] != "oracle") & (sub["recall"] > recall["oracle"])]
        if not above.empty:
            above_parts.append(f"{subset}: {', '.join(above['method'])}")
    notes = []
    if no_gap:
        notes.append(
            f"No gap closed for {', '.join(no_gap)}: the oracle is less than {MIN_GAP:.2f} "
            "above general there, so there is no gap to share."
        )
    if above_parts:
        notes.append(
            f"Above the oracle ({'; '.join(above_parts)}): the LLM told the plan did not "
            "repeat all of it, so the oracle is no ceiling there and their gap closed is no "
            "share of a gap."
        )
    return " ".join(notes)


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate_methods` measured."""

    results: pd.DataFrame  # one row per (encounter, method)
    table: pd.DataFrame  # aggregated, see `aggregate`
    calibration: dict[str, Any]  # `Calibration.to_json`
    llm: str


def evaluate_methods(
    client: LLMClient,
    tables: Mapping[str, pd.DataFrame],
    signals_for: Callable[[Sequence[str]], Mapping[str, PatientSignals]],
    methods: Sequence[str] = METHODS,
    settings: EvalSettings | None = None,
    config: PromptConfig = INITIAL_CONFIG,
    progress: Progress | None = None,
    edit_methods: Mapping[str, EditMethod] | None = None,
    judge: PlanJudge | None = None,
    calibration: Calibration | None = None,
    tick: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Run every method on the same chosen test encounters with the same LLM; score and aggregate.

    ``signals_for(encounter_ids)`` returns the recommender's signals (see
    `promptenv.signals.signals_for`). ``edit_methods`` adds methods that choose
    a config per encounter by edits (`promptenv.search`: the policy, random
    edits, per-patient search), each under its own name. ``llm_calls`` counts
    the calls a method spends to build one prompt (0 for all but per-patient
    search); one more call answers it (free for search: its best answer is cached).
    ``judge`` (`promptenv.judge`) also grades every answer: a ``judge`` column in
    [0, 1], NaN when there is no judge or its reply broke the rubric.
    ``calibration``: the matching threshold to score with (a workspace's,
    `promptenv.calibration.workspace_calibration`); without it the threshold is
    calibrated here on ``settings.n_calibration`` validation encounters.
    ``tick(done, total)`` follows the answers (a progress bar).
    """
    settings = settings or EvalSettings()
    say = progress or (lambda _m: None)
    edit_methods = dict(edit_methods or {})
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    clash = sorted(set(edit_methods) & set(METHODS))
    if clash:
        raise ValueError(f"edit method names {clash} clash with the prompt methods")
    index = tables["index_encounters"]
    chosen = pick_encounters(index, settings)
    if chosen.empty:
        raise ValueError(
            f"no {settings.split} index encounters to evaluate: ingest a cohort with `pmlm run` or `pmlm ingest`"
        )
    if calibration is None:
        calibration = evaluation_calibration(client, tables, settings, progress=say)
    scorer = calibration.scorer()
    store = ContextStore(dict(tables), only_encounters=list(chosen["encounter_id"]))
    refs = references(tables, chosen)
    say(f"threshold {scorer.threshold}; computing signals for {len(chosen)} test encounters")
    signals = signals_for(list(chosen["encounter_id"]))
    prompts = [(e, p, 0) for e, p in build_prompts(store, chosen, signals, refs, methods, config)]
    if edit_methods:
        cases = build_cases(tables, chosen, lambda _ids: signals, refs, store)
        reward = AnswerReward(client, scorer, settings.params)
        for name, choose in edit_methods.items():
            say(f"{name}: choosing a prompt for each of {len(cases)} encounters")
            reward.progress = progress_lines(say, f"{name}: answers to choose from")
            choices = choose(cases, reward)
            reward.progress = None
            for case, choice in zip(cases, choices, strict=True):
                p = assemble(case.context, case.signals, choice.config, name)
                provenance = {**p.provenance, "edits": list(choice.trace), **choice.extra}
                prompts.append(
                    (
                        case.encounter_id,
                        Prompt(name, p.system, p.user, p.tokens, p.config, provenance),
                        choice.llm_calls,
                    )
                )
    say(f"asking {client.label} for {len(prompts)} answers ({len(chosen)} encounters × methods)")
    lines = progress_lines(say, "answers")

    def answered(done: int, total: int) -> None:
        lines(done, total)
        if tick is not None:
            tick(done, total)

    completions = client.generate_many(
        [GenerationRequest(p.system, p.user, settings.params) for _, p, _ in prompts],
        concurrency=settings.concurrency,
        progress=answered,
    )
    say("scoring")
    answers = [c.text for c in completions]
    scores = scorer.score_many(
        answers, [refs[e].items for e, _, _ in prompts], [refs[e].plan_text for e, _, _ in prompts]
    )
    grades = [np.nan] * len(answers)
    if judge is not None:
        say(f"asking the judge {judge.label} to grade {len(answers)} answers")
        verdicts = judge.judge_many(
            [refs[e].items for e, _, _ in prompts], answers, concurrency=settings.concurrency
        )
        grades = [v.score for v in verdicts]
    flags = chosen.set_index("encounter_id")[["patient_id", "in_obstetric", "in_adult"]]
    rows = []
    for (eid, prompt, calls), completion, score, grade in zip(
        prompts, completions, scores, grades, strict=True
    ):
        rows.append(
            {
                "encounter_id": eid,
                "patient_id": flags.at[eid, "patient_id"],
                "in_obstetric": bool(flags.at[eid, "in_obstetric"]),
                "in_adult": bool(flags.at[eid, "in_adult"]),
                "method": prompt.method,
                "recall": score.recall,
                "precision": score.precision,
                "rouge_l": score.rouge_l,
                "reward": score.reward,
                "judge": grade,
                "words": score.words,
                "prompt_tokens": prompt.tokens,
                "llm_calls": calls,
                "input_tokens": completion.usage.input_tokens,
                "output_tokens": completion.usage.output_tokens,
                "cached": completion.cached,
                "answer": completion.text,
                "reference_items": len(refs[eid].items),
                # what the report's patient pages show (`promptenv.report_html`)
                "system": prompt.system,
                "question": prompt.user,
                "provenance": json.dumps(prompt.provenance, default=str),
                "plan_items": json.dumps(list(refs[eid].items)),
                "covered": json.dumps(list(score.covered)),
            }
        )
    results = pd.DataFrame(rows)
    return Evaluation(results, aggregate(results, settings), calibration.to_json(), client.label)


def markdown_table(table: pd.DataFrame) -> str:
    """The aggregated table as Markdown: mean [95% CI] per metric."""
    lines = [
        "| subset | method | n | plan-item recall | precision | ROUGE-L F1 | reward | words | gap closed | prompt tokens | LLM calls/patient |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    judged = "judge" in table.columns
    if judged:  # the LLM-as-judge column, with how many answers it could grade
        lines[0] += " judge (0-1) |"
        lines[1] += "---|"

    def ci(r: Any, m: str) -> str:
        return f"{getattr(r, m):.3f} [{getattr(r, m + '_lo'):.3f}, {getattr(r, m + '_hi'):.3f}]"

    for r in table.itertuples(index=False):
        gap = "" if pd.isna(r.gap_closed) else f"{r.gap_closed:.2f}"
        lines.append(
            f"| {r.subset} | {r.method} | {r.n} | {ci(r, 'recall')} | {ci(r, 'precision')} | {ci(r, 'rouge_l')} | "
            f"{ci(r, 'reward')} | {r.words:.0f} | {gap} | {r.prompt_tokens:.0f} | {r.llm_calls_per_patient:.0f} |"
        )
        if judged:
            grade = ci(r, "judge") if r.judge_n else "none"
            lines[-1] += f" {grade}{'' if r.judge_n == r.n else f' ({r.judge_n} of {r.n})'} |"
    return "\n".join(lines)


__all__ = [
    "EVAL_PARAMS",
    "EvalSettings",
    "Evaluation",
    "Reference",
    "aggregate",
    "bootstrap_ci",
    "evaluate_methods",
    "markdown_table",
    "pick_encounters",
    "references",
]
