"""Ranking metrics, validation tuning, and the side-by-side comparison table.

Metrics per state, at cut-off k, with R = the distinct items of the next
encounter's plan (ALL of them: items outside the vocabulary count as missed):

* precision@k = |top-k ∩ R| / k
* recall@k    = |top-k ∩ R| / |R|
* nDCG@k      = Σ_{r≤k} rel_r / log2(r+1)  ÷  Σ_{r≤min(k,|R|)} 1 / log2(r+1)
* MAP@k       = Σ_{r≤k} precision@r · rel_r  ÷  min(k, |R|)
* AUC         = P(a random in-vocabulary item of R outranks a random item not in R),
                ties counting one half; undefined (NaN, skipped) when R has no
                in-vocabulary item

Table values are means over states with |R| > 0. Ties in the top-k go to the
lower item index, i.e. to the more popular item (the vocabulary is ordered by
train popularity).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.stats

from recsys.base import Recommender, make_recommender
from recsys.blend import BlendRecommender
from recsys.interactions import PatientStates
from recsys.signals import top_k
from recsys.type_aliases import IndexVector, Mask, SparseMatrix

METRICS = ("precision", "recall", "ndcg", "map", "auc")

#: Small validation grids: every combination is fitted once on train patients.
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "popularity": {},
    "repeat_previous": {},
    "lightfm": {"epochs": [20, 50], "max_sampled": [10, 30]},
    "als": {"factors": [32, 64], "regularization": [0.1, 1.0], "alpha": [20.0]},
    "bpr": {"iterations": [200, 400], "learning_rate": [0.2]},
    "item_knn": {"similarity": ["cosine", "tfidf"], "K": [400, 1000]},
}
#: Models that are ranked against each other (baselines are always reported too).
PERSONALIZED_MODELS = ("lightfm", "als", "bpr", "item_knn")
BASELINES = ("popularity", "repeat_previous")


def ranking_metrics(
    scores: npt.NDArray[np.floating[Any]], targets: SparseMatrix, n_true: IndexVector, k: int = 10
) -> pd.DataFrame:
    """Per-state metrics (see module docstring).

    Args:
        scores: (n, n_items) float.
        targets: (n, n_items) CSR, nonzero = the item is in the next plan.
        n_true: (n,) distinct next-plan items, including out-of-vocabulary ones.
        k: cut-off.
    Returns: frame with n rows and columns ``n_true, hits, precision, recall, ndcg,
        map, auc`` (float64; metrics are NaN when ``n_true == 0``).
    """
    relevant = np.asarray(targets.toarray() != 0)
    top, _ = top_k(np.asarray(scores), k)
    kk = top.shape[1]
    rel = np.take_along_axis(relevant, top, axis=1).astype(np.float64)
    hits = rel.sum(axis=1)
    n_true_f = np.asarray(n_true, dtype=np.float64)
    discount = 1.0 / np.log2(np.arange(2, kk + 2))
    dcg = rel @ discount
    ideal_counts = np.minimum(n_true_f, kk).astype(np.int64)
    ideal = np.concatenate([[0.0], np.cumsum(discount)])[ideal_counts]
    precision_at = np.cumsum(rel, axis=1) / np.arange(1, kk + 1)
    has = n_true_f > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = pd.DataFrame(
            {
                "n_true": n_true_f,
                "hits": hits,
                "precision": np.where(has, hits / k, np.nan),
                "recall": np.where(has, hits / n_true_f, np.nan),
                "ndcg": np.where(has, dcg / ideal, np.nan),
                "map": np.where(has, (precision_at * rel).sum(axis=1) / ideal_counts, np.nan),
                "auc": _auc(np.asarray(scores), relevant),
            }
        )
    return out


def _auc(scores: npt.NDArray[Any], relevant: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    v = scores.shape[1]
    pos = relevant.sum(axis=1).astype(np.float64)
    neg = v - pos
    ranks = scipy.stats.rankdata(scores, axis=1, method="average")
    pos_rank_sum = (ranks * relevant).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_rank_sum - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def state_metrics(
    model: Recommender, states: PatientStates, k: int = 10, chunk_size: int = 8192
) -> pd.DataFrame:
    """:func:`ranking_metrics` of ``model`` on ``states``, scored in chunks (row order kept)."""
    targets, n_true = states.require_targets()
    parts = []
    for start in range(0, len(states), chunk_size):
        rows = np.arange(start, min(len(states), start + chunk_size))
        chunk = states.subset(rows)
        parts.append(ranking_metrics(model.score(chunk), targets[rows], n_true[rows], k))
    if not parts:
        return ranking_metrics(np.zeros((0, states.n_items), dtype=np.float32), targets, n_true, k)
    return pd.concat(parts, ignore_index=True)


def summarize(metrics: pd.DataFrame, mask: Mask | None = None) -> dict[str, float]:
    """Means of the metrics over states with a reference (optionally within ``mask``)."""
    frame = metrics if mask is None else metrics[np.asarray(mask, dtype=bool)]
    frame = frame[frame["n_true"] > 0]
    out: dict[str, float] = {"n_states": float(len(frame))}
    for name in METRICS:
        out[name] = float(frame[name].mean()) if len(frame) else float("nan")
    return out


def subset_masks(states: PatientStates) -> dict[str, Mask]:
    """The reported subsets: all index encounters, obstetric ones, adult ones."""
    return {
        "all": np.ones(len(states), dtype=bool),
        "obstetric": states.keys["is_obstetric"].to_numpy(dtype=bool),
        "adult": states.keys["is_adult"].to_numpy(dtype=bool),
    }


def comparison_table(
    models: Mapping[str, Recommender],
    states: PatientStates,
    k: int = 10,
    subsets: Iterable[str] = ("all", "obstetric"),
    reference: str = "popularity",
) -> pd.DataFrame:
    """Every model side by side on the same states.

    Returns: one row per (subset, model), columns ``subset, model, n_states,
    precision@k, recall@k, ndcg@k, map@k, auc, ndcg_vs_<reference>`` (the ratio of the
    model's nDCG@k to the reference model's on the same subset).
    """
    masks = subset_masks(states)
    rows = []
    for name, model in models.items():
        metrics = state_metrics(model, states, k)
        for subset in subsets:
            summary = summarize(metrics, masks[subset])
            rows.append(
                {
                    "subset": subset,
                    "model": name,
                    "n_states": int(summary["n_states"]),
                    f"precision@{k}": summary["precision"],
                    f"recall@{k}": summary["recall"],
                    f"ndcg@{k}": summary["ndcg"],
                    f"map@{k}": summary["map"],
                    "auc": summary["auc"],
                }
            )
    table = pd.DataFrame(rows)
    if reference in models:
        ref = table[table["model"] == reference].set_index("subset")[f"ndcg@{k}"]
        table[f"ndcg_vs_{reference}"] = table[f"ndcg@{k}"] / table["subset"].map(ref)
    order = {s: i for i, s in enumerate(subsets)}
    return table.sort_values(
        ["subset", "model"], key=lambda c: c.map(order) if c.name == "subset" else c
    ).reset_index(drop=True)


def to_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""

    def cell(value: Any) -> str:
        if isinstance(value, float | np.floating):
            return "" if np.isnan(value) else f"{value:.{digits}f}"
        return str(value)

    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


# --------------------------------------------------------------------------- tuning


@dataclass(frozen=True)
class TuningResult:
    """The chosen parameters of one model and every grid point's validation score."""

    name: str
    params: dict[str, Any]
    score: float
    trials: pd.DataFrame  # one row per grid point: params..., metric


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of a parameter grid, in a fixed order ({} for an empty grid)."""
    names = sorted(grid)
    return [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(grid[n] for n in names))
    ]


def selection_mask(states: PatientStates, select_on: str) -> Mask:
    return subset_masks(states)[select_on]


def tune(
    name: str,
    train: PatientStates,
    validation: PatientStates,
    grid: Mapping[str, Sequence[Any]] | None = None,
    k: int = 10,
    metric: str = "ndcg",
    select_on: str = "all",
    fixed: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    on_point: Callable[[], None] | None = None,
) -> tuple[TuningResult, Recommender]:
    """Fit ``name`` on train for each grid point, keep the best on VALIDATION patients.

    ``progress`` is told each point's score; ``on_point()`` is called after each point.
    Returns: the tuning result and the best model (fitted on train).
    """
    points = grid_points(grid if grid is not None else DEFAULT_GRIDS.get(name, {}))
    mask = selection_mask(validation, select_on)
    trials = []
    best: tuple[float, Recommender, dict[str, Any]] | None = None
    for point in points:
        params = {**(fixed or {}), **point}
        model = make_recommender(name, **params).fit(train)
        value = summarize(state_metrics(model, validation, k), mask)[metric]
        trials.append({**point, f"{metric}@{k}": value})
        if progress:
            progress(f"{name} {point}: {metric}@{k} = {value:.4f}")
        if on_point:
            on_point()
        if best is None or value > best[0]:
            best = (value, model, params)
    assert best is not None
    return TuningResult(name, best[2], best[0], pd.DataFrame(trials)), best[1]


def tune_blend(
    models: Sequence[Recommender],
    validation: PatientStates,
    k: int = 10,
    metric: str = "ndcg",
    select_on: str = "all",
    step: float = 0.1,
) -> tuple[BlendRecommender, pd.DataFrame]:
    """Weights (on a simplex grid of ``step``) of a blend of fitted models, chosen on
    VALIDATION patients; a single model alone is one of the candidates.

    Returns: the best blend and one row per weight vector tried.
    """
    from recsys.blend import standardize_rows

    targets, n_true = validation.require_targets()
    mask = selection_mask(validation, select_on)
    standardized = [standardize_rows(m.score(validation))[0] for m in models]
    n_steps = round(1 / step)
    trials = []
    best: tuple[float, tuple[float, ...]] | None = None
    for combo in itertools.product(range(n_steps + 1), repeat=len(models)):
        if sum(combo) != n_steps:
            continue
        weights = tuple(c / n_steps for c in combo)
        scores = sum(w * s for w, s in zip(weights, standardized, strict=True))
        assert isinstance(scores, np.ndarray)
        value = summarize(ranking_metrics(scores, targets, n_true, k), mask)[metric]
        trials.append(
            {
                **{f"w_{m.name}": w for m, w in zip(models, weights, strict=True)},
                f"{metric}@{k}": value,
            }
        )
        if best is None or value > best[0] + 1e-12:
            best = (value, weights)
    assert best is not None
    return BlendRecommender.from_fitted(models, best[1]), pd.DataFrame(trials)


def write_report(table: pd.DataFrame, reports_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem.csv`` and ``stem.md`` into ``reports_dir``; returns both paths."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = reports_dir / f"{stem}.csv", reports_dir / f"{stem}.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(to_markdown(table))
    return csv_path, md_path
