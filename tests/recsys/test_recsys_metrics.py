"""Ranking metrics against values computed by hand, tuning and the comparison table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recsys.base import make_recommender
from recsys.evaluate import (
    comparison_table,
    grid_points,
    ranking_metrics,
    state_metrics,
    summarize,
    to_markdown,
    tune,
    tune_blend,
    write_report,
)
from recsys.interactions import PatientStates


def _case() -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
    scores = np.array(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5],  # relevant {0, 2} + one item outside the vocabulary
            [1.0, 1.0, 1.0, 1.0, 1.0],  # all tied; relevant {4}
            [0.1, 0.2, 0.3, 0.4, 0.5],  # no reference plan
            [0.5, 0.1, 0.2, 0.3, 0.4],  # relevant {1, 2, 3, 4}: k=3 ideal is three hits
        ],
        dtype=np.float32,
    )
    relevant = np.zeros((4, 5), dtype=np.float32)
    relevant[0, [0, 2]] = 1
    relevant[1, 4] = 1
    relevant[3, [1, 2, 3, 4]] = 1
    n_true = np.array([3, 1, 0, 4])
    return scores, sp.csr_matrix(relevant), n_true


def test_metrics_match_hand_computed_values() -> None:
    scores, targets, n_true = _case()
    m = ranking_metrics(scores, targets, n_true, k=3)
    # state 0: top-3 = items 0, 1, 2 -> relevance 1, 0, 1
    assert m.loc[0, "precision"] == pytest.approx(2 / 3)
    assert m.loc[0, "recall"] == pytest.approx(2 / 3)
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert m.loc[0, "ndcg"] == pytest.approx(dcg / idcg)
    assert m.loc[0, "map"] == pytest.approx((1 / 1 + 2 / 3) / 3)
    # AUC over vocabulary items: positives .9, .7 vs negatives .8, .6, .5 -> 5 of 6 pairs
    assert m.loc[0, "auc"] == pytest.approx(5 / 6)
    # state 1: ties go to the lower index, so item 4 is not in the top 3; AUC of ties = 1/2
    assert m.loc[1, ["precision", "recall", "ndcg", "map"]].tolist() == [0, 0, 0, 0]
    assert m.loc[1, "auc"] == pytest.approx(0.5)
    # state 2: no reference -> undefined
    assert m.loc[2, ["precision", "recall", "ndcg", "map", "auc"]].isna().all()
    # state 3: top-3 = items 0, 4, 3 -> relevance 0, 1, 1; 4 true items, ideal DCG over 3
    assert m.loc[3, "precision"] == pytest.approx(2 / 3)
    assert m.loc[3, "recall"] == pytest.approx(2 / 4)
    assert m.loc[3, "ndcg"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / idcg)
    assert m.loc[3, "map"] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert m.loc[3, "auc"] == pytest.approx(0.0)  # the only negative (item 0) outranks all


def test_summary_averages_states_with_a_reference() -> None:
    scores, targets, n_true = _case()
    m = ranking_metrics(scores, targets, n_true, k=3)
    summary = summarize(m)
    assert summary["n_states"] == 3
    assert summary["precision"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    only = summarize(m, np.array([True, False, True, False]))
    assert only["n_states"] == 1 and only["recall"] == pytest.approx(2 / 3)


def test_perfect_ranking_scores_one() -> None:
    relevant = sp.csr_matrix(np.array([[0, 1, 1, 0]], dtype=np.float32))
    scores = np.array([[0.0, 2.0, 1.0, -1.0]], dtype=np.float32)
    m = ranking_metrics(scores, relevant, np.array([2]), k=2)
    assert m.loc[0, ["precision", "recall", "ndcg", "map", "auc"]].tolist() == [1, 1, 1, 1, 1]


def test_grid_points_cover_every_combination() -> None:
    assert grid_points({}) == [{}]
    points = grid_points({"b": [1, 2], "a": ["x"]})
    assert points == [{"a": "x", "b": 1}, {"a": "x", "b": 2}]


def test_tuning_keeps_the_best_validation_point(states: PatientStates) -> None:
    train, validation = states.split("train"), states.split("validation")
    points: list[int] = []
    result, model = tune(
        "item_knn", train, validation, {"K": [1, 50]}, on_point=lambda: points.append(1)
    )
    assert len(result.trials) == 2 == len(points)
    assert result.score == pytest.approx(result.trials["ndcg@10"].max())
    assert model.params["K"] == result.params["K"]


def test_blend_weights_are_chosen_on_validation(
    states: PatientStates, fast_params: dict[str, dict[str, object]]
) -> None:
    train, validation = states.split("train"), states.split("validation")
    models = [
        make_recommender(n, **fast_params[n]).fit(train)
        for n in ("als", "repeat_previous", "popularity")
    ]
    blend, trials = tune_blend(models, validation, step=0.25)
    assert len(trials) == 15  # compositions of 4 quarters into 3 weights
    assert sum(blend.weights) == pytest.approx(1.0)
    best = trials["ndcg@10"].max()
    assert summarize(state_metrics(blend, validation))["ndcg"] == pytest.approx(best, abs=1e-6)
    singles = trials[(trials.filter(like="w_") == 1.0).any(axis=1)]
    assert best >= singles["ndcg@10"].max()


def test_comparison_table_and_reports(
    states: PatientStates, tmp_path: Path, fast_params: dict[str, dict[str, object]]
) -> None:
    train, test = states.split("train"), states.split("test")
    models = {
        n: make_recommender(n, **fast_params[n]).fit(train)
        for n in ("popularity", "repeat_previous", "item_knn")
    }
    table = comparison_table(models, test, k=5)
    assert list(table["subset"].unique()) == ["all", "obstetric"]
    assert len(table) == 6
    assert set(table.columns) >= {"precision@5", "recall@5", "ndcg@5", "map@5", "auc"}
    assert table.loc[table["model"] == "popularity", "ndcg_vs_popularity"].tolist() == [1.0, 1.0]
    n_obstetric = int(test.keys["is_obstetric"].sum())
    assert table.loc[table["subset"] == "obstetric", "n_states"].tolist() == [n_obstetric] * 3
    csv_path, md_path = write_report(table, tmp_path / "reports", "cmp")
    pd.testing.assert_frame_equal(pd.read_csv(csv_path), table, check_dtype=False)
    text = md_path.read_text()
    assert text.startswith("| subset | model |") and text.count("\n") == len(table) + 2
    assert to_markdown(table) == text


def test_fit_models_ticks_once_per_setting_of_every_grid(tmp_path: Path) -> None:
    from pipelines.cohort import prepare_default_cohort
    from pipelines.workspace import Workspace
    from recsys.steps import fit_models

    ws = Workspace.at(tmp_path)
    prepare_default_cohort(ws)
    ticks: list[tuple[int, int]] = []
    grids = {"item_knn": {"K": [5, 50]}, "popularity": {}}
    fit_models(
        ws,
        ["item_knn", "popularity"],
        grids=grids,
        blend=False,
        tick=lambda d, t: ticks.append((d, t)),
    )
    assert ticks == [(1, 3), (2, 3), (3, 3)]
