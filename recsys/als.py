"""Implicit-feedback ALS (implicit's ``AlternatingLeastSquares``) over [features | next items].

Training rows are TRAIN states; columns are the state's features followed by
the items of its next plan, so the factorization learns which histories lead
to which next items. A new state is folded in with implicit's
``recalculate_user`` on its feature columns only (the next-item columns are
unknown, not zero): an exact least-squares solve against the fixed feature
factors. Scores are the folded-in factors times the item factors.

Each score decomposes over the state's features (Hu, Koren & Volinsky 2008,
section 5): ``score(u, i) = Σ_j c_uj · y_j^T W_u^{-1} y_i``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from recsys.base import Recommender, feature_rows, single_threaded_blas
from recsys.interactions import PatientStates
from recsys.type_aliases import ArrayDict, FloatMatrix, IndexMatrix, SparseMatrix


class ALSRecommender(Recommender):
    """Parameters: ``factors``, ``regularization``, ``alpha`` (confidence scale),
    ``iterations``, ``feature_weight``/``target_weight`` (values of the two column
    blocks), ``num_threads`` (0 = all cores), ``seed``."""

    name: ClassVar[str] = "als"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.feature_factors: FloatMatrix | None = None  # (n_features, factors)
        self.item_factors: FloatMatrix | None = None  # (n_items, factors)

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {
            "factors": 32,
            "regularization": 0.1,
            "alpha": 20.0,
            "iterations": 15,
            "feature_weight": 1.0,
            "target_weight": 1.0,
            "num_threads": 0,
            "seed": 0,
        }

    def _fit(self, train: PatientStates) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        p = self.params
        targets, _ = train.require_targets()
        matrix = sp.hstack(
            [p["feature_weight"] * train.features, p["target_weight"] * targets], format="csr"
        ).astype(np.float32)
        with single_threaded_blas():
            model = AlternatingLeastSquares(
                factors=p["factors"],
                regularization=p["regularization"],
                alpha=p["alpha"],
                iterations=p["iterations"],
                num_threads=p["num_threads"],
                random_state=p["seed"],
            )
            model.fit(matrix, show_progress=False)
        factors = np.asarray(model.item_factors, dtype=np.float32)
        self.feature_factors = factors[: train.n_features].copy()
        self.item_factors = factors[train.n_features :].copy()

    def _fold_in(self, features: SparseMatrix) -> FloatMatrix:
        """(n, factors) user factors solved against the feature factors only."""
        from implicit.cpu.als import AlternatingLeastSquares

        p = self.params
        assert self.feature_factors is not None
        rows = (p["feature_weight"] * features).astype(np.float32).tocsr()
        with single_threaded_blas():
            solver = AlternatingLeastSquares(
                factors=self.feature_factors.shape[1],
                regularization=p["regularization"],
                alpha=p["alpha"],
                num_threads=p["num_threads"],
            )
            solver.item_factors = self.feature_factors
            users = solver.recalculate_user(np.arange(rows.shape[0]), rows)
        return np.asarray(users, dtype=np.float32).reshape(rows.shape[0], -1)

    def _score(self, states: PatientStates) -> FloatMatrix:
        assert self.item_factors is not None
        return self._fold_in(states.features) @ self.item_factors.T

    def _embed(self, states: PatientStates) -> FloatMatrix:
        return self._fold_in(states.features)

    def _pair_contributions(self, states: PatientStates, items: IndexMatrix) -> FloatMatrix:
        features = states.features
        assert self.feature_factors is not None and self.item_factors is not None
        p = self.params
        y = self.feature_factors.astype(np.float64)
        d = y.shape[1]
        conf = (p["alpha"] * p["feature_weight"] * features).tocsr()
        conf.sort_indices()
        # W_u = Y^T Y + λI + Σ_j (c_uj - 1) y_j y_j^T, one (d, d) system per state
        outer = np.einsum("fi,fj->fij", y, y).reshape(len(y), d * d)
        shifted = conf.copy()
        shifted.data = shifted.data - 1.0
        base = y.T @ y + p["regularization"] * np.eye(d)
        systems = base[None] + np.asarray(shifted @ outer).reshape(-1, d, d)
        rhs = self.item_factors.astype(np.float64)[items].transpose(0, 2, 1)  # (m, d, k)
        solved = np.linalg.solve(systems, rhs)  # (m, d, k) = W_u^{-1} y_i
        rows = feature_rows(conf)
        values = np.einsum("nd,ndk->nk", y[conf.indices], solved[rows], optimize=True)
        return (conf.data[:, None] * values).astype(np.float32)

    def _arrays(self) -> ArrayDict:
        assert self.feature_factors is not None and self.item_factors is not None
        return {"feature_factors": self.feature_factors, "item_factors": self.item_factors}

    def _restore(self, arrays: ArrayDict, folder: Path) -> None:
        self.feature_factors = np.asarray(arrays["feature_factors"], dtype=np.float32)
        self.item_factors = np.asarray(arrays["item_factors"], dtype=np.float32)
