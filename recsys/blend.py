"""A weighted sum of per-state standardized scores of several recommenders.

    blend(state) = Σ_c w_c · (score_c(state) - mean_c(state)) / std_c(state)

where mean and std are taken over the items of that state's score row, so models
on different scales mix fairly. Weights are chosen on validation patients
(:func:`recsys.evaluate.tune_blend`). Contributions are the components'
contributions scaled by ``w_c / std_c``: the per-state mean has no feature
behind it, so a blend explains the part of each score that differs between items.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from recsys.base import Recommender, load_recommender, make_recommender
from recsys.interactions import PatientStates
from recsys.type_aliases import ArrayDict, FloatMatrix, IndexMatrix


def standardize_rows(scores: FloatMatrix) -> tuple[FloatMatrix, FloatMatrix]:
    """Per-row z-scores of (n, n_items) scores, and the (n, 1) row std used (0 → 1)."""
    mean = scores.mean(axis=1, keepdims=True, dtype=np.float64)
    std = scores.std(axis=1, keepdims=True, dtype=np.float64)
    std[std == 0] = 1.0
    return ((scores - mean) / std).astype(np.float32), std.astype(np.float32)


class BlendRecommender(Recommender):
    """Parameters: ``components`` (names), ``weights`` (same length),
    ``component_params`` (one dict per component). ``embed`` is the first component's.

    Build one from models that are already fitted with :meth:`from_fitted`.
    """

    name: ClassVar[str] = "blend"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        n = len(self.params["components"])
        if len(self.params["weights"]) != n:
            raise ValueError("blend: one weight per component")
        if not self.params["component_params"]:
            self.params["component_params"] = [{} for _ in range(n)]
        if len(self.params["component_params"]) != n:
            raise ValueError("blend: one component_params dict per component")
        self.models: list[Recommender] = []

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {
            "components": ["als", "repeat_previous"],
            "weights": [0.5, 0.5],
            "component_params": [],
        }

    @classmethod
    def from_fitted(
        cls, models: Sequence[Recommender], weights: Sequence[float]
    ) -> BlendRecommender:
        """A blend of fitted models (they must share one vocabulary)."""
        fingerprints = {m.vocab.fingerprint if m.vocab else None for m in models}
        if None in fingerprints or len(fingerprints) != 1:
            raise ValueError("blend components must be fitted on the same vocabulary")
        blend = cls(
            components=[m.name for m in models],
            weights=[float(w) for w in weights],
            component_params=[dict(m.params) for m in models],
        )
        blend.models = list(models)
        blend.vocab = models[0].vocab
        return blend

    @property
    def weights(self) -> list[float]:
        return [float(w) for w in self.params["weights"]]

    @property
    def explains(self) -> bool:
        return any(m.explains for m, w in zip(self.models, self.weights, strict=True) if w)

    def _fit(self, train: PatientStates) -> None:
        self.models = [
            make_recommender(name, **cp).fit(train)
            for name, cp in zip(
                self.params["components"], self.params["component_params"], strict=True
            )
        ]

    def _score(self, states: PatientStates) -> FloatMatrix:
        total = np.zeros((len(states), states.n_items), dtype=np.float32)
        for model, weight in zip(self.models, self.weights, strict=True):
            if weight:
                total += weight * standardize_rows(model.score(states))[0]
        return total

    def _embed(self, states: PatientStates) -> FloatMatrix:
        return self.models[0].embed(states)

    def _pair_contributions(self, states: PatientStates, items: IndexMatrix) -> FloatMatrix:
        total = np.zeros((states.features.nnz, items.shape[1]), dtype=np.float32)
        rows = np.repeat(np.arange(len(states)), np.diff(states.features.indptr))
        for model, weight in zip(self.models, self.weights, strict=True):
            if weight and model.explains:
                _, std = standardize_rows(model.score(states))
                part = model._pair_contributions(states, items)
                total += (weight / std[rows]) * part
        return total

    def _arrays(self) -> ArrayDict:
        return {"weights": np.asarray(self.weights, dtype=np.float64)}

    def _save_extra(self, folder: Path) -> None:
        for i, model in enumerate(self.models):
            model.save(folder / f"component_{i}")

    def _restore(self, arrays: ArrayDict, folder: Path) -> None:
        self.models = [
            load_recommender(folder / f"component_{i}")
            for i in range(len(self.params["components"]))
        ]
