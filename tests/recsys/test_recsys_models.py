"""Model-specific checks: fold-ins match implicit's own code, contributions add up."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsys.base import Recommender, make_recommender
from recsys.interactions import PatientStates

Params = dict[str, dict[str, object]]


def _fit(name: str, train: PatientStates, params: Params) -> Recommender:
    return make_recommender(name, **params[name]).fit(train)


def _all_contributions(model: Recommender, states: PatientStates, items: np.ndarray) -> np.ndarray:
    contrib = model.contributions(states, items, n_reasons=states.n_features, positive_only=False)
    assert contrib is not None
    return contrib.values.sum(axis=2)


@pytest.mark.filterwarnings("ignore:Method expects CSR input")
def test_item_knn_scores_equal_implicits_recommend(
    train: PatientStates, unseen: PatientStates, fast_params: Params
) -> None:
    """Scoring a new state = implicit's recommend() on a [features | no items] user row."""
    from implicit.nearest_neighbours import CosineRecommender

    model = _fit("item_knn", train, fast_params)
    targets, _ = train.require_targets()
    reference = CosineRecommender(K=fast_params["item_knn"]["K"])
    reference.fit(sp.hstack([train.features, targets], format="csr"), show_progress=False)
    n_f = train.n_features
    rows = sp.hstack(
        [unseen.features[:5], sp.csr_matrix((5, unseen.n_items), dtype=np.float32)], format="csr"
    )
    ours = model.score(unseen.subset(np.arange(5)))
    for r in range(5):
        ids, scores = reference.recommend(
            r, rows[r], N=n_f + unseen.n_items, filter_already_liked_items=False
        )
        full = np.zeros(n_f + unseen.n_items)
        full[ids] = scores
        np.testing.assert_allclose(ours[r], full[n_f:], rtol=1e-4, atol=1e-5)


def test_als_fold_in_equals_implicits_recalculate_user(
    train: PatientStates, unseen: PatientStates, fast_params: Params
) -> None:
    from implicit.cpu.als import AlternatingLeastSquares

    from recsys.als import ALSRecommender

    model = _fit("als", train, fast_params)
    assert isinstance(model, ALSRecommender)
    p = model.params
    solver = AlternatingLeastSquares(
        factors=p["factors"], regularization=p["regularization"], alpha=p["alpha"]
    )
    solver.item_factors = model.feature_factors
    users = solver.recalculate_user(np.arange(len(unseen)), unseen.features.tocsr())
    np.testing.assert_allclose(model.embed(unseen), users, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["als", "item_knn"])
def test_contributions_sum_to_the_score(
    name: str, train: PatientStates, unseen: PatientStates, fast_params: Params
) -> None:
    model = _fit(name, train, fast_params)
    scores = model.score(unseen)
    items = np.argsort(-scores, axis=1)[:, :5]
    total = _all_contributions(model, unseen, items)
    np.testing.assert_allclose(total, np.take_along_axis(scores, items, 1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("name", "bias"), [("lightfm", "item_biases"), ("bpr", "item_biases")])
def test_centered_contributions_explain_the_state_specific_part(
    name: str, bias: str, train: PatientStates, unseen: PatientStates, fast_params: Params
) -> None:
    """Contributions sum to score - item bias - the row's mean of (score - item bias)."""
    model = _fit(name, train, fast_params)
    scores = model.score(unseen)
    personal = scores - getattr(model, bias)[None, :]
    centered = personal - personal.mean(axis=1, keepdims=True)
    items = np.argsort(-scores, axis=1)[:, :5]
    total = _all_contributions(model, unseen, items)
    np.testing.assert_allclose(total, np.take_along_axis(centered, items, 1), rtol=1e-3, atol=2e-3)


def test_repeat_previous_ranks_the_latest_plan_first(
    train: PatientStates, unseen: PatientStates, fast_params: Params
) -> None:
    model = _fit("repeat_previous", train, fast_params)
    scores = model.score(unseen)
    for row in range(0, len(unseen), 11):
        repeated = set(unseen.last_plan[row].indices)
        top = np.argsort(-scores[row], kind="stable")[: len(repeated)]
        assert set(top) == repeated
    items = np.argsort(-scores, axis=1)[:, :3]
    contrib = model.contributions(unseen, items, n_reasons=1)
    assert contrib is not None
    index = unseen.vocab.feature_index()
    for row in range(len(unseen)):
        for j, item in enumerate(items[row]):
            feature = index.get(f"last_plan:{unseen.vocab.items[item]}", -1)
            in_plan = unseen.last_plan[row, item] > 0
            assert (contrib.features[row, j, 0] == feature) == bool(in_plan and feature >= 0)


def test_popularity_is_the_train_share(
    train: PatientStates, unseen: PatientStates, fast_params: Params
) -> None:
    model = _fit("popularity", train, fast_params)
    targets, _ = train.require_targets()
    share = np.asarray(targets.sum(axis=0)).ravel() / len(train)
    np.testing.assert_allclose(model.score(unseen)[0], share, rtol=1e-6)


def test_blend_of_one_model_ranks_like_that_model(
    train: PatientStates, unseen: PatientStates, fast_params: Params
) -> None:
    from recsys.blend import BlendRecommender

    als = _fit("als", train, fast_params)
    pop = _fit("popularity", train, fast_params)
    blend = BlendRecommender.from_fitted([als, pop], [1.0, 0.0])
    a, b = np.argsort(-als.score(unseen), axis=1), np.argsort(-blend.score(unseen), axis=1)
    assert (a[:, :5] == b[:, :5]).mean() > 0.99
    with pytest.raises(ValueError, match="same vocabulary"):
        BlendRecommender.from_fitted([als, make_recommender("popularity")], [0.5, 0.5])


def test_unknown_names_and_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown recommender"):
        make_recommender("svd")
    with pytest.raises(TypeError, match="unknown parameters"):
        make_recommender("als", factor=3)
