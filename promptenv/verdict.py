"""The evaluation in one plain sentence: did PMLM beat the best fixed prompt and the bare question?

`closing_verdict` is the sentence the evaluation ends with: on obstetric test
encounters, or on adult ones where there is no obstetric encounter.

`verdict` compares the policy's prompts (``pmlm``) on the evaluated test
encounters with two others, on plan-item recall, paired over the encounters
both answered, with 95% intervals bootstrapped over PATIENTS
(`promptenv.paired.paired_table`):

- the best fixed prompt *on these encounters* (the strongest deployable rival
  in hindsight: a harder comparison than the one the policy's start was chosen
  by, on validation patients; nothing is chosen with it);
- the bare question (``general``).

"Beats" means the interval lies above 0, "is worse than" below 0; otherwise
the difference is within what chance gives on this many patients, and the
sentence says so rather than rounding it to a win.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from promptenv.evaluate import SUBSETS
from promptenv.paired import paired_table

#: Fixed prompts a deployment could use (no plan, no LLM call per patient), the bare question first.
FIXED_PROMPTS: tuple[str, ...] = (
    "general",
    "full_record",
    "retrieval",
    "self",
    "peer",
    "pmlm_initial",
)


def _judge(lo: float, hi: float) -> str:
    if lo == hi == 0:
        return "gives the same recall as"
    if lo > 0:
        return "beats"
    if hi < 0:
        return "is worse than"
    return "is not distinguishable from"


def verdict(
    results: pd.DataFrame,
    subset: str = "obstetric",
    method: str = "pmlm",
    fixed: Sequence[str] = FIXED_PROMPTS,
    reps: int = 10_000,
    seed: int = 0,
) -> str:
    """One sentence on ``method`` against the best fixed prompt and ``general`` on ``subset``
    (``results``: `promptenv.evaluate.Evaluation.results`); "" when ``method`` or every fixed
    prompt is missing."""
    sub = results[results[f"in_{subset}"]] if f"in_{subset}" in results else results.iloc[:0]
    present = set(sub["method"]) if len(sub) else set()
    rivals = [m for m in fixed if m in present]
    if method not in present or not rivals:
        return ""
    means = sub.groupby("method")["recall"].mean()
    best = max(rivals, key=lambda m: (means[m], -rivals.index(m)))
    table = paired_table(sub[sub["method"].isin({method, *rivals})], method, "recall", reps, seed)
    by = table.set_index("method")
    patients = int(sub.loc[sub["method"] == method, "patient_id"].nunique())
    n = int((sub["method"] == method).sum())
    who = (
        f"{n} {subset} test encounter{'s' * (n != 1)} of {patients} patient{'s' * (patients != 1)}"
    )
    if patients < 2:
        return (
            f"On {who}, PMLM's prompts reach a plan-item recall of {means[method]:.3f}, the best "
            f"fixed prompt on them ({best}) {means[best]:.3f}. Verdict: PMLM cannot be judged on "
            "one patient (no interval): compare on more test encounters (--n-obstetric)."
        )
    parts, judged = [], []
    compared = [best] + (["general"] if "general" in rivals and best != "general" else [])
    for rival in compared:
        row = by.loc[rival]
        # the table holds rival − method: turn it round to method − rival
        # (0.0 - x, not -x: an exact tie prints +0.000, not -0.000)
        diff, lo, hi = 0.0 - row["difference"], 0.0 - row["hi"], 0.0 - row["lo"]
        label = "the bare question" if rival == "general" else "the best fixed prompt on them"
        parts.append(
            f"against {label} ({rival}, {means[rival]:.3f}): {diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        )
        judged.append(f"{_judge(lo, hi)} {label} ({rival})")
    name = "PMLM's prompts (the policy's)" if method == "pmlm" else f"{method}'s prompts"
    return (
        f"On {who}, {name} reach a plan-item "
        f"recall of {means[method]:.3f}; " + "; ".join(parts) + " (paired, 95% intervals "
        "bootstrapped over patients). Verdict: PMLM " + " and ".join(judged) + "."
    )


def closing_verdict(results: pd.DataFrame, reps: int = 10_000, seed: int = 0) -> str:
    """The evaluation's closing sentence: `verdict` on the first subset of `SUBSETS`
    (obstetric) the evaluation holds encounters of, saying so when it is not the first (a
    cohort of men has no obstetric encounter); "" when there is nothing to judge."""
    first = SUBSETS[0]
    for subset in SUBSETS:
        column = f"in_{subset}"
        if column not in results or not results[column].any():
            continue
        sentence = verdict(results, subset, reps=reps, seed=seed)
        if subset == first or not sentence:
            return sentence
        return f"No {first} encounter among the test patients evaluated. {sentence}"
    return ""


__all__ = ["FIXED_PROMPTS", "closing_verdict", "verdict"]
