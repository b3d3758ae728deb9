"""The contract every recommender fulfils, run against each implementation.

One parametrized suite over every name the factory knows: a new model is
covered by adding it to ``recsys.base.RECOMMENDERS`` (and to FAST_PARAMS in conftest).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.base import (
    RECOMMENDERS,
    NotFittedError,
    Recommender,
    load_recommender,
    make_recommender,
)
from recsys.evaluate import state_metrics, summarize
from recsys.interactions import PatientStates, StateSettings, Vocabulary

NAMES = sorted(RECOMMENDERS)


Params = dict[str, dict[str, object]]


def _fit(name: str, train: PatientStates, params: Params) -> Recommender:
    return make_recommender(name, **params[name]).fit(train)


@pytest.fixture(scope="module")
def fitted(train: PatientStates, fast_params: Params) -> dict[str, Recommender]:
    return {name: _fit(name, train, fast_params) for name in NAMES}


def test_every_registered_model_has_fast_test_params(fast_params: Params) -> None:
    assert set(NAMES) == set(fast_params)


@pytest.mark.parametrize("name", NAMES)
class TestRecommenderContract:
    def test_scores_one_finite_float32_row_per_state(
        self, name: str, fitted: dict[str, Recommender], unseen: PatientStates
    ) -> None:
        scores = fitted[name].score(unseen)
        assert scores.shape == (len(unseen), unseen.n_items)
        assert scores.dtype == np.float32
        assert np.isfinite(scores).all()

    def test_embeddings_have_a_fixed_width(
        self, name: str, fitted: dict[str, Recommender], unseen: PatientStates, train: PatientStates
    ) -> None:
        a, b = fitted[name].embed(unseen), fitted[name].embed(train)
        assert a.dtype == np.float32 and np.isfinite(a).all()
        assert a.ndim == 2 and a.shape[0] == len(unseen) and a.shape[1] == b.shape[1] >= 1

    def test_fit_is_deterministic_for_a_seed(
        self,
        name: str,
        fitted: dict[str, Recommender],
        train: PatientStates,
        unseen: PatientStates,
        fast_params: Params,
    ) -> None:
        again = _fit(name, train, fast_params)
        np.testing.assert_allclose(
            again.score(unseen), fitted[name].score(unseen), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            again.embed(unseen), fitted[name].embed(unseen), rtol=1e-5, atol=1e-6
        )

    def test_save_load_round_trip_gives_the_same_scores(
        self, name: str, fitted: dict[str, Recommender], unseen: PatientStates, tmp_path: Path
    ) -> None:
        model = fitted[name]
        model.save(tmp_path / name)
        loaded = load_recommender(tmp_path / name)
        assert type(loaded) is type(model)
        assert loaded.params == model.params
        assert loaded.vocab == model.vocab
        assert np.array_equal(loaded.score(unseen), model.score(unseen))
        assert np.array_equal(loaded.embed(unseen), model.embed(unseen))

    def test_unseen_states_are_scored_without_refit(
        self, name: str, fitted: dict[str, Recommender], train: PatientStates, unseen: PatientStates
    ) -> None:
        model = fitted[name]
        assert not set(unseen.keys["patient_id"]) & set(train.keys["patient_id"])
        before = {k: v.copy() for k, v in model._arrays().items()}
        scores = model.score(unseen)
        model.embed(unseen)
        after = model._arrays()
        assert before.keys() == after.keys()
        for key in before:
            assert np.array_equal(before[key], after[key]), key
        distinct_rows = len(np.unique(scores.round(5), axis=0))
        if model.personalized:
            assert distinct_rows > len(unseen) // 4
        else:
            assert distinct_rows == 1

    def test_a_states_scores_do_not_depend_on_its_batch(
        self, name: str, fitted: dict[str, Recommender], unseen: PatientStates
    ) -> None:
        model = fitted[name]
        rows = [3, 0, len(unseen) - 1]
        together = model.score(unseen)[rows]
        alone = np.vstack([model.score(unseen.subset([r])) for r in rows])
        np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-5)

    def test_an_unfitted_model_refuses_to_score(
        self, name: str, unseen: PatientStates, fast_params: Params
    ) -> None:
        with pytest.raises(NotFittedError):
            make_recommender(name, **fast_params[name]).score(unseen)

    def test_states_from_another_vocabulary_are_refused(
        self, name: str, fitted: dict[str, Recommender], unseen: PatientStates
    ) -> None:
        vocab = unseen.vocab
        other = Vocabulary(
            vocab.items,
            vocab.item_displays,
            vocab.item_kinds,
            vocab.features,
            vocab.feature_displays,
            StateSettings(recent_days=30),
        )
        foreign = PatientStates(
            unseen.keys,
            unseen.features,
            unseen.history,
            unseen.last_plan,
            unseen.targets,
            unseen.n_true,
            other,
        )
        with pytest.raises(ValueError, match="vocabulary"):
            fitted[name].score(foreign)

    def test_it_learns_something(
        self, name: str, fitted: dict[str, Recommender], unseen: PatientStates
    ) -> None:
        """Better than a random ranking; personalized models better than popularity."""
        ndcg = summarize(state_metrics(fitted[name], unseen))["ndcg"]
        rng = np.random.default_rng(0)
        targets, n_true = unseen.require_targets()
        from recsys.evaluate import ranking_metrics

        random_ndcg = np.mean(
            [
                summarize(
                    ranking_metrics(rng.random((len(unseen), unseen.n_items)), targets, n_true)
                )["ndcg"]
                for _ in range(5)
            ]
        )
        assert ndcg > random_ndcg + 0.1
        if fitted[name].personalized:
            assert ndcg > summarize(state_metrics(fitted["popularity"], unseen))["ndcg"]

    def test_contributions_point_at_the_states_own_features(
        self, name: str, fitted: dict[str, Recommender], unseen: PatientStates
    ) -> None:
        model = fitted[name]
        items = np.argsort(-model.score(unseen), axis=1)[:, :4]
        contrib = model.contributions(unseen, items, n_reasons=3)
        if not model.explains:
            assert contrib is None
            return
        assert contrib is not None
        assert contrib.features.shape == contrib.values.shape == (len(unseen), 4, 3)
        present = contrib.features >= 0
        assert present.any()
        assert (contrib.values[present] > 0).all()
        assert (contrib.values[~present] == 0).all()
        # descending within each (state, item)
        assert (np.diff(contrib.values, axis=2) <= 1e-7).all()
        for row, item, slot in zip(*np.nonzero(present), strict=True):
            feature = contrib.features[row, item, slot]
            assert unseen.features[row, feature] != 0
