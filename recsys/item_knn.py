"""Implicit's item-item nearest neighbours over [features | next items].

The similarity matrix is learned by implicit (cosine, BM25 or TF-IDF weighted,
``K`` neighbours per column) on TRAIN rows ``[features | next-plan items]``.
Only its feature → item block is used: a state's score for an item is the sum,
over the state's features, of feature value × similarity(feature, item), which is
exactly what implicit's ``recommend`` computes for a new user row, so states
never seen in training need no refit and each term is that feature's
contribution (the "neighbour" that drives the prediction).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from recsys.base import (
    Recommender,
    feature_rows,
    pack_sparse,
    single_threaded_blas,
    unpack_sparse,
)
from recsys.interactions import PatientStates
from recsys.type_aliases import ArrayDict, FloatMatrix, IndexMatrix, SparseMatrix


class ItemKNNRecommender(Recommender):
    """Parameters: ``similarity`` (``cosine``/``bm25``/``tfidf``), ``K`` (neighbours per
    column), ``bm25_k1``/``bm25_b``, ``target_weight``, ``num_threads``.

    ``embed`` is the unit-normalized score row (n_states, n_items): item-item models
    have no latent space, their view of a state is its predicted next-item profile.
    """

    name: ClassVar[str] = "item_knn"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.similarity: SparseMatrix | None = None  # (n_features, n_items) CSR
        self._dense: FloatMatrix | None = None

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {
            "similarity": "cosine",
            "K": 200,
            "bm25_k1": 1.2,
            "bm25_b": 0.75,
            "target_weight": 1.0,
            "num_threads": 0,
        }

    def _model(self) -> Any:
        from implicit.nearest_neighbours import (
            BM25Recommender,
            CosineRecommender,
            TFIDFRecommender,
        )

        p = self.params
        if p["similarity"] == "cosine":
            return CosineRecommender(K=p["K"], num_threads=p["num_threads"])
        if p["similarity"] == "bm25":
            return BM25Recommender(
                K=p["K"], K1=p["bm25_k1"], B=p["bm25_b"], num_threads=p["num_threads"]
            )
        if p["similarity"] == "tfidf":
            return TFIDFRecommender(K=p["K"], num_threads=p["num_threads"])
        raise ValueError(f"unknown similarity {p['similarity']!r}")

    def _fit(self, train: PatientStates) -> None:
        targets, _ = train.require_targets()
        matrix = sp.hstack(
            [train.features, self.params["target_weight"] * targets], format="csr"
        ).astype(np.float32)
        with single_threaded_blas(), warnings.catch_warnings():
            # implicit's own normalize() hands its kNN a COO matrix and then warns about it
            warnings.filterwarnings("ignore", message="Method expects CSR input")
            model = self._model()
            model.fit(matrix, show_progress=False)
        full = sp.csr_matrix(model.similarity, dtype=np.float32)
        block = full[: train.n_features, train.n_features :].tocsr().astype(np.float32)
        block.sort_indices()
        self.similarity = block
        self._dense = None

    def _score(self, states: PatientStates) -> FloatMatrix:
        assert self.similarity is not None
        return np.asarray((states.features @ self.similarity).toarray(), dtype=np.float32)

    def _embed(self, states: PatientStates) -> FloatMatrix:
        scores = self._score(states)
        norms = np.linalg.norm(scores, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        return scores / norms

    def _pair_contributions(self, states: PatientStates, items: IndexMatrix) -> FloatMatrix:
        features = states.features
        assert self.similarity is not None
        if self._dense is None:
            self._dense = np.asarray(self.similarity.toarray(), dtype=np.float32)
        rows = feature_rows(features)
        return features.data[:, None] * self._dense[features.indices[:, None], items[rows]]

    def _arrays(self) -> ArrayDict:
        assert self.similarity is not None
        return pack_sparse("similarity", self.similarity)

    def _restore(self, arrays: ArrayDict, folder: Path) -> None:
        self.similarity = unpack_sparse("similarity", arrays).astype(np.float32)
        self._dense = None
