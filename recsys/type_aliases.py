"""Named types for the shapes that recur across the recommender package."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

#: Dense float32 matrix, e.g. scores ``(n_states, n_items)`` or embeddings ``(n_states, dim)``.
FloatMatrix: TypeAlias = npt.NDArray[np.float32]
#: Dense float32 vector.
FloatVector: TypeAlias = npt.NDArray[np.float32]
#: Dense int matrix of indices, e.g. top-k item indices ``(n_states, k)``.
IndexMatrix: TypeAlias = npt.NDArray[np.int64]
#: Dense int vector of indices.
IndexVector: TypeAlias = npt.NDArray[np.int64]
#: Boolean mask over states.
Mask: TypeAlias = npt.NDArray[np.bool_]
#: Sparse row-major matrix; in this package always float32 and canonical (sorted, no duplicates).
SparseMatrix: TypeAlias = sp.csr_matrix
#: Arrays a recommender saves: name → dense array (sparse matrices are split into parts).
ArrayDict: TypeAlias = dict[str, npt.NDArray[np.generic]]
#: A callback that receives a step's progress lines (a logger's ``info``, ``print``...).
Progress: TypeAlias = Callable[[str], None]
#: What a step calls after each unit of work, ``tick(done, total)``: a progress bar's update.
Tick: TypeAlias = Callable[[int, int], None]
