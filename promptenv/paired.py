"""Paired differences between methods on the same encounters, bootstrapped over PATIENTS.

Every method of an evaluation answers the same encounters, so the right test of
"method beats baseline" is the per-encounter difference. Several encounters of
one patient are not independent: the interval is a cluster bootstrap, which
resamples patients with all their encounters (`scipy.stats.bootstrap` over the
patients' sums and counts of differences, resampled together, ``paired=True``;
percentile intervals, like the table's). Rows without a ``patient_id`` are
resampled per encounter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy.stats import bootstrap

from promptenv.evaluate import METHOD_ORDER, SUBSETS, EvalSettings

COLUMNS = ["subset", "metric", "method", "n", "patients", "difference", "lo", "hi"]


def paired_baseline(results: pd.DataFrame) -> str:
    """What a report compares against: the policy (``pmlm``) when it was evaluated, else
    the initial prompt (``pmlm_initial``)."""
    return "pmlm" if "pmlm" in set(results["method"]) else "pmlm_initial"


def cluster_bootstrap_ci(
    diff: NDArray[np.float64], clusters: NDArray[np.object_], reps: int, seed: int
) -> tuple[float, float]:
    """95% percentile interval of the mean of ``diff`` when whole ``clusters`` are resampled."""
    frame = pd.DataFrame({"d": diff, "c": clusters}).groupby("c", sort=True)["d"]
    sums, counts = frame.sum().to_numpy(float), frame.count().to_numpy(float)
    if len(sums) < 2:
        return (float("nan"), float("nan"))

    def mean(s: NDArray[np.float64], c: NDArray[np.float64], axis: int = -1) -> NDArray[np.float64]:
        ratio: NDArray[np.float64] = s.sum(axis=axis) / c.sum(axis=axis)
        return ratio

    result = bootstrap(
        (sums, counts),
        mean,
        n_resamples=reps,
        paired=True,
        vectorized=True,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_table(
    rows: pd.DataFrame,
    baseline: str,
    metric: str,
    reps: int = 1000,
    seed: int = 0,
    cluster: str = "patient_id",
) -> pd.DataFrame:
    """Per method other than ``baseline``: the mean of (method − baseline) over the encounters
    both answered, and its cluster-bootstrap 95% interval (columns n, patients, difference, lo, hi)."""
    by = cluster if cluster in rows else "encounter_id"
    keys = ["encounter_id"] if by == "encounter_id" else ["encounter_id", by]
    wide = rows.pivot_table(index=keys, columns="method", values=metric).reset_index()
    if baseline not in wide:
        raise ValueError(
            f"no method {baseline!r} among the evaluated {sorted(set(rows['method']))}: "
            "evaluate it too, or compare against one of those"
        )
    out = []
    for method in [m for m in dict.fromkeys(rows["method"]) if m != baseline]:
        both = wide[[by, method, baseline]].dropna()
        diff = (both[method] - both[baseline]).to_numpy(dtype=float)
        lo, hi = cluster_bootstrap_ci(diff, both[by].to_numpy(dtype=object), reps, seed)
        out.append(
            {
                "method": method,
                "n": len(diff),
                "patients": int(both[by].nunique()),
                "difference": float(diff.mean()) if len(diff) else np.nan,
                "lo": lo,
                "hi": hi,
            }
        )
    return pd.DataFrame(out, columns=COLUMNS[2:])


def paired_differences(
    results: pd.DataFrame,
    settings: EvalSettings,
    baseline: str = "pmlm_initial",
    metrics: Sequence[str] = ("recall", "reward"),
) -> pd.DataFrame:
    """`paired_table` per subset and metric (``settings.bootstrap`` resamples, ``settings.seed``),
    methods in the table's order (`METHOD_ORDER`)."""
    tables = []
    for subset in SUBSETS:
        sub = results[results[f"in_{subset}"]]
        if sub.empty or baseline not in set(sub["method"]):
            continue
        for metric in metrics:
            table = paired_table(sub, baseline, metric, settings.bootstrap, settings.seed)
            tables.append(table.assign(subset=subset, metric=metric))
    if not tables:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(tables, ignore_index=True)[COLUMNS]
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return table.sort_values(
        ["subset", "metric", "method"],
        key=lambda s: s.map(lambda m: rank.get(m, len(rank))) if s.name == "method" else s,
        kind="stable",
    ).reset_index(drop=True)


def markdown_differences(table: pd.DataFrame, baseline: str = "pmlm_initial") -> str:
    """`paired_differences` as Markdown; a difference whose interval excludes 0 is in bold."""
    lines = [
        f"| subset | metric | method | n | patients | method − {baseline} [paired 95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for r in table.itertuples(index=False):
        cell = f"{r.difference:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}]"
        if r.lo > 0 or r.hi < 0:
            cell = f"**{cell}**"
        lines.append(f"| {r.subset} | {r.metric} | {r.method} | {r.n} | {r.patients} | {cell} |")
    return "\n".join(lines)


def paired_section(results: pd.DataFrame, settings: EvalSettings) -> str:
    """The report's paragraph of paired differences against `paired_baseline` ("" when the
    baseline was not evaluated)."""
    if results.empty:
        return ""
    baseline = paired_baseline(results)
    table = paired_differences(results, settings, baseline)
    if table.empty:
        return ""
    name = "the policy (pmlm)" if baseline == "pmlm" else "PMLM initial"
    return (
        f"Paired differences against {name} (same encounters; 95% intervals bootstrapped "
        "over patients, each resampled with all her encounters; bold: the interval "
        "excludes 0):\n\n" + markdown_differences(table, baseline)
    )


__all__ = [
    "cluster_bootstrap_ci",
    "markdown_differences",
    "paired_baseline",
    "paired_differences",
    "paired_section",
    "paired_table",
]
