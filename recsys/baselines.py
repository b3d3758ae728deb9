"""Two baselines every model must beat: global popularity and "repeat the previous plan"."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from recsys.base import Recommender, feature_rows
from recsys.interactions import PatientStates
from recsys.type_aliases import ArrayDict, FloatMatrix, FloatVector, IndexMatrix, SparseMatrix


def _dense_unit_rows(matrix: SparseMatrix) -> FloatMatrix:
    dense = np.asarray(matrix.toarray(), dtype=np.float32)
    norms = np.linalg.norm(dense, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return dense / norms


def _popularity(train: PatientStates) -> FloatVector:
    targets, _ = train.require_targets()
    counts = np.asarray(targets.sum(axis=0), dtype=np.float64).ravel()
    return (counts / max(1, len(train))).astype(np.float32)


class PopularityRecommender(Recommender):
    """Scores = share of TRAIN states whose next plan contained the item; same for everyone.

    ``embed`` has no latent space to offer: it returns the unit-normalized plan-history
    row (n_states, n_items), so peers are patients with similar past plans.
    """

    name: ClassVar[str] = "popularity"
    personalized: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.popularity: FloatVector | None = None

    def _fit(self, train: PatientStates) -> None:
        self.popularity = _popularity(train)

    def _score(self, states: PatientStates) -> FloatMatrix:
        assert self.popularity is not None
        return np.broadcast_to(self.popularity, (len(states), states.n_items)).copy()

    def _embed(self, states: PatientStates) -> FloatMatrix:
        return _dense_unit_rows(states.history)

    def _arrays(self) -> ArrayDict:
        assert self.popularity is not None
        return {"popularity": self.popularity}

    def _restore(self, arrays: ArrayDict, folder: Path) -> None:
        self.popularity = np.asarray(arrays["popularity"], dtype=np.float32)


class RepeatPreviousRecommender(Recommender):
    """Scores = 1 for the items of the patient's latest plan at or before ``index_time``.

    Items outside that plan (and ties inside it) are ordered by train popularity,
    through a tiny ``tie_break`` weight that never lets a popular item pass a
    repeated one. ``embed`` is the unit-normalized latest-plan row (n_states, n_items).
    Each repeated item is explained by the feature ``last_plan:<item>``.
    """

    name: ClassVar[str] = "repeat_previous"
    personalized: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.popularity: FloatVector | None = None
        self._last_plan_feature: np.ndarray | None = None

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {"tie_break": 1e-3}

    def _fit(self, train: PatientStates) -> None:
        self.popularity = _popularity(train)

    def _score(self, states: PatientStates) -> FloatMatrix:
        assert self.popularity is not None
        top = float(self.popularity.max()) if self.popularity.size else 1.0
        tie = self.params["tie_break"] * self.popularity / (top or 1.0)
        return np.asarray(states.last_plan.toarray(), dtype=np.float32) + tie[None, :]

    def _embed(self, states: PatientStates) -> FloatMatrix:
        return _dense_unit_rows(states.last_plan)

    def _pair_contributions(self, states: PatientStates, items: IndexMatrix) -> FloatMatrix:
        features = states.features
        if self._last_plan_feature is None:
            assert self.vocab is not None
            index = self.vocab.feature_index()
            self._last_plan_feature = np.array(
                [index.get(f"last_plan:{key}", -1) for key in self.vocab.items], dtype=np.int64
            )
        out = np.zeros((features.nnz, items.shape[1]), dtype=np.float32)
        # only stored "last_plan:<item>" values can explain a repeated item
        is_last = np.zeros(self.vocab.n_features if self.vocab else 0, dtype=bool)
        is_last[self._last_plan_feature[self._last_plan_feature >= 0]] = True
        at = np.flatnonzero(is_last[features.indices] & (features.data > 0))
        rows = feature_rows(features)[at]
        wanted = self._last_plan_feature[items[rows]]  # (len(at), k)
        out[at] = (features.indices[at, None] == wanted).astype(np.float32)
        return out

    def _arrays(self) -> ArrayDict:
        assert self.popularity is not None
        return {"popularity": self.popularity}

    def _restore(self, arrays: ArrayDict, folder: Path) -> None:
        self.popularity = np.asarray(arrays["popularity"], dtype=np.float32)
