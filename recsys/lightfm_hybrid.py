"""LightFM hybrid model (WARP loss) on the state features.

A state is represented ONLY by its features (no per-state identity column), so a
state never seen in training is scored exactly like a training state: its
embedding is the (row-normalized) feature row times the feature embeddings.

    score(state, item) = Σ_j x_j e_j · v_item + Σ_j x_j b_j + c_item

The middle term is the same for every item and the item bias ``c_item`` does not
depend on the state, so what ranks items FOR THIS STATE is ``Σ_j x_j e_j · v_item``.
A feature's contribution is its share of that, measured against the average item
(``v̄`` = mean item embedding): ``x_j e_j · (v_item - v̄)``; positive means the
feature pushes the item above a typical one. The contributions sum to
``score - c_item - mean over items of (score - c)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from recsys.base import Recommender, feature_rows, row_normalize
from recsys.interactions import PatientStates
from recsys.type_aliases import ArrayDict, FloatMatrix, FloatVector, IndexMatrix, SparseMatrix


class LightFMRecommender(Recommender):
    """LightFM with user features = state features and item identity features.

    Parameters: ``no_components``, ``loss`` (``warp``), ``learning_rate``,
    ``item_alpha``/``user_alpha`` (L2 penalties), ``max_sampled``, ``epochs``,
    ``num_threads`` (1 keeps fits deterministic), ``seed``, ``normalize``
    (``l1``/``l2``/``none``: row normalization of the features).
    """

    name: ClassVar[str] = "lightfm"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.feature_embeddings: FloatMatrix | None = None  # (n_features, d)
        self.feature_biases: FloatVector | None = None  # (n_features,)
        self.item_embeddings: FloatMatrix | None = None  # (n_items, d)
        self.item_biases: FloatVector | None = None  # (n_items,)
        self._feature_item: FloatMatrix | None = None  # (n_features, n_items), see below

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {
            "no_components": 32,
            "loss": "warp",
            "learning_rate": 0.05,
            "item_alpha": 1e-6,
            "user_alpha": 1e-6,
            "max_sampled": 10,
            "epochs": 30,
            "num_threads": 1,
            "seed": 0,
            "normalize": "l2",
        }

    def _features(self, states: PatientStates) -> SparseMatrix:
        return row_normalize(states.features, self.params["normalize"])

    def _fit(self, train: PatientStates) -> None:
        from lightfm import LightFM

        p = self.params
        targets, _ = train.require_targets()
        model = LightFM(
            no_components=p["no_components"],
            loss=p["loss"],
            learning_rate=p["learning_rate"],
            item_alpha=p["item_alpha"],
            user_alpha=p["user_alpha"],
            max_sampled=p["max_sampled"],
            random_state=np.random.RandomState(p["seed"]),
        )
        model.fit(
            targets.tocoo(),
            user_features=self._features(train),
            epochs=p["epochs"],
            num_threads=p["num_threads"],
        )
        self.feature_embeddings = np.asarray(model.user_embeddings, dtype=np.float32)
        self.feature_biases = np.asarray(model.user_biases, dtype=np.float32)
        self.item_embeddings = np.asarray(model.item_embeddings, dtype=np.float32)
        self.item_biases = np.asarray(model.item_biases, dtype=np.float32)
        self._feature_item = None

    def _embed(self, states: PatientStates) -> FloatMatrix:
        assert self.feature_embeddings is not None
        return np.asarray(self._features(states) @ self.feature_embeddings, dtype=np.float32)

    def _score(self, states: PatientStates) -> FloatMatrix:
        assert self.item_embeddings is not None and self.feature_biases is not None
        assert self.item_biases is not None
        x = self._features(states)
        users = np.asarray(x @ self.feature_embeddings, dtype=np.float32)
        user_bias = np.asarray(x @ self.feature_biases, dtype=np.float32)
        return users @ self.item_embeddings.T + user_bias[:, None] + self.item_biases[None, :]

    def _pair_contributions(self, states: PatientStates, items: IndexMatrix) -> FloatMatrix:
        features = states.features
        assert self.feature_embeddings is not None and self.item_embeddings is not None
        assert self.feature_biases is not None
        if self._feature_item is None:
            # e_j · (v_i - v̄) for every feature j and item i, computed once
            centered = self.item_embeddings - self.item_embeddings.mean(axis=0, keepdims=True)
            self._feature_item = (self.feature_embeddings @ centered.T).astype(np.float32)
        x = row_normalize(features, self.params["normalize"])
        rows = feature_rows(x)
        return x.data[:, None] * self._feature_item[x.indices[:, None], items[rows]]

    def _arrays(self) -> ArrayDict:
        assert self.feature_embeddings is not None and self.feature_biases is not None
        assert self.item_embeddings is not None and self.item_biases is not None
        return {
            "feature_embeddings": self.feature_embeddings,
            "feature_biases": self.feature_biases,
            "item_embeddings": self.item_embeddings,
            "item_biases": self.item_biases,
        }

    def _restore(self, arrays: ArrayDict, folder: Path) -> None:
        self.feature_embeddings = np.asarray(arrays["feature_embeddings"], dtype=np.float32)
        self.feature_biases = np.asarray(arrays["feature_biases"], dtype=np.float32)
        self.item_embeddings = np.asarray(arrays["item_embeddings"], dtype=np.float32)
        self.item_biases = np.asarray(arrays["item_biases"], dtype=np.float32)
        self._feature_item = None
