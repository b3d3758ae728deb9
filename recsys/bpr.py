"""Implicit's Bayesian Personalized Ranking over [features | next items].

BPR is fitted by SGD on triples, so a new user has no closed-form factors
(implicit's BPR does not support ``recalculate_user``). A state is folded in
through a linear map from its feature row to the latent space, fitted by ridge
regression on the TRAIN states' learned factors:

    M = argmin ||X_train M - U_train||² + λ ||M||²,   u(state) = x(state) M

so scores stay linear in the features: ``score(u, i) = Σ_j x_j (m_j · v_i) + b_i``
(the item bias ``b_i`` is BPR's extra factor column). A feature's contribution is
measured against the average item, ``x_j m_j · (v_i - v̄)``, so that positive
means "pushes this item above a typical one"; they sum to
``score - b_i - mean over items of (score - b)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from recsys.base import Recommender, feature_rows, single_threaded_blas
from recsys.interactions import PatientStates
from recsys.type_aliases import ArrayDict, FloatMatrix, FloatVector, IndexMatrix


class BPRRecommender(Recommender):
    """Parameters: ``factors``, ``learning_rate``, ``regularization``, ``iterations``,
    ``map_regularization`` (λ of the fold-in map), ``feature_columns`` (also rank the
    feature columns in training; by default only next-plan items are ranked, which
    keeps the SGD on the targets), ``num_threads`` (1 keeps fits deterministic: BPR's
    SGD is Hogwild with more), ``seed``."""

    name: ClassVar[str] = "bpr"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.feature_map: FloatMatrix | None = None  # (n_features, factors)
        self.item_factors: FloatMatrix | None = None  # (n_items, factors)
        self.item_biases: FloatVector | None = None  # (n_items,)
        self._feature_item: FloatMatrix | None = None  # (n_features, n_items), see below

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {
            "factors": 32,
            "learning_rate": 0.2,
            "regularization": 0.01,
            "iterations": 200,
            "map_regularization": 1.0,
            "feature_columns": False,
            "num_threads": 1,
            "seed": 0,
        }

    def _fit(self, train: PatientStates) -> None:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        p = self.params
        targets, _ = train.require_targets()
        blocks = [train.features, targets] if p["feature_columns"] else [targets]
        matrix = sp.hstack(blocks, format="csr").astype(np.float32)
        offset = train.n_features if p["feature_columns"] else 0
        with single_threaded_blas():
            model = BayesianPersonalizedRanking(
                factors=p["factors"],
                learning_rate=p["learning_rate"],
                regularization=p["regularization"],
                iterations=p["iterations"],
                num_threads=p["num_threads"],
                random_state=p["seed"],
            )
            model.fit(matrix, show_progress=False)
        k = p["factors"]
        item = np.asarray(model.item_factors, dtype=np.float64)[offset:]
        users = np.asarray(model.user_factors, dtype=np.float64)[:, :k]
        self.item_factors = item[:, :k].astype(np.float32)
        self.item_biases = item[:, k].astype(np.float32)
        # X^T X and X^T U accumulated over row blocks: bounded memory at any size
        n_f = train.n_features
        gram = p["map_regularization"] * np.eye(n_f)
        rhs = np.zeros((n_f, k))
        for start in range(0, len(train), 65_536):
            block = train.features[start : start + 65_536].astype(np.float64)
            gram += (block.T @ block).toarray()
            rhs += block.T @ users[start : start + 65_536]
        self.feature_map = scipy.linalg.solve(gram, rhs, assume_a="pos").astype(np.float32)
        self._feature_item = None

    def _embed(self, states: PatientStates) -> FloatMatrix:
        assert self.feature_map is not None
        return np.asarray(states.features @ self.feature_map, dtype=np.float32)

    def _score(self, states: PatientStates) -> FloatMatrix:
        assert self.item_factors is not None and self.item_biases is not None
        return self._embed(states) @ self.item_factors.T + self.item_biases[None, :]

    def _pair_contributions(self, states: PatientStates, items: IndexMatrix) -> FloatMatrix:
        features = states.features
        assert self.feature_map is not None and self.item_factors is not None
        if self._feature_item is None:
            # m_j · (v_i - v̄) for every feature j and item i, computed once
            centered = self.item_factors - self.item_factors.mean(axis=0, keepdims=True)
            self._feature_item = (self.feature_map @ centered.T).astype(np.float32)
        rows = feature_rows(features)
        return features.data[:, None] * self._feature_item[features.indices[:, None], items[rows]]

    def _arrays(self) -> ArrayDict:
        assert self.feature_map is not None and self.item_factors is not None
        assert self.item_biases is not None
        return {
            "feature_map": self.feature_map,
            "item_factors": self.item_factors,
            "item_biases": self.item_biases,
        }

    def _restore(self, arrays: ArrayDict, folder: Path) -> None:
        self.feature_map = np.asarray(arrays["feature_map"], dtype=np.float32)
        self.item_factors = np.asarray(arrays["item_factors"], dtype=np.float32)
        self.item_biases = np.asarray(arrays["item_biases"], dtype=np.float32)
        self._feature_item = None
