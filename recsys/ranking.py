"""Ranking helpers shared by the signals and the metrics: top-k, unit rows, labelled columns."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd

from recsys.type_aliases import FloatMatrix, IndexMatrix


def top_k(scores: FloatMatrix, k: int) -> tuple[IndexMatrix, FloatMatrix]:
    """Top-k columns of each row, best first (ties: lower column first).

    Args:
        scores: (n, n_items) float.
    Returns: indices (n, min(k, n_items)) int64 and their scores (float32).
    """
    n, v = scores.shape
    k = min(k, v)
    if k == 0:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32)
    if k < v:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(v), (n, v))
    part_scores = np.take_along_axis(scores, part, axis=1)
    # sort by score desc, then by column asc
    order = np.lexsort((part, -part_scores), axis=1)
    idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return idx, np.take_along_axis(part_scores, order, axis=1).astype(np.float32)


def unit_rows(matrix: FloatMatrix) -> FloatMatrix:
    """Rows scaled to unit L2 norm (zero rows stay zero); float32."""
    out = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return out / norms


def take_rows(column: pd.Series, rows: npt.NDArray[np.int64]) -> pd.Series:
    """``column`` at ``rows`` with its dtype kept (no per-row Python objects)."""
    return column.take(rows).reset_index(drop=True)


def coded_labels(labels: tuple[str, ...], index: npt.NDArray[np.int64]) -> pd.Categorical:
    """Categorical of ``labels[index]`` built from codes (no per-row strings)."""
    codes, uniques = pd.factorize(pd.Series(labels, dtype=object))
    return pd.Categorical.from_codes(codes[index], categories=pd.Index(uniques, dtype=object))
