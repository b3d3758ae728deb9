"""The one interface every recommender implements, and the factory that picks one.

A :class:`Recommender` is fitted on TRAIN patient states and then scores any
patient state, including states of patients it never saw, without refitting:
each implementation folds a new state in from its feature row (the patient's
profile, active problems and plan history as of ``index_time``).

==================  ==========================================================
``fit(train)``      learn from train states and their targets (next-plan items)
``score(states)``   (n_states, n_items) float32, higher = more likely next
``embed(states)``   (n_states, dim) float32, the model's view of each state
                    (cosine between rows = patient similarity)
``contributions``   for chosen items, the features that push each score most
``save/load``       a folder: ``recommender.json``, ``vocabulary.json``, ``arrays.npz``
==================  ==========================================================

Usage::

    model = make_recommender("als", factors=32).fit(states.split("train"))
    scores = model.score(states.split("test"))        # (n_test, n_items)
    model.save(path); same = load_recommender(path)
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from pipelines.errors import MissingStepError
from pipelines.workspace import publishing_dir
from recsys.interactions import PatientStates, Vocabulary
from recsys.type_aliases import ArrayDict, FloatMatrix, IndexMatrix, SparseMatrix

FORMAT_VERSION = 1

#: name → "module:Class" (imported on first use, so that e.g. LightFM loads only when asked)
RECOMMENDERS: dict[str, str] = {
    "popularity": "recsys.baselines:PopularityRecommender",
    "repeat_previous": "recsys.baselines:RepeatPreviousRecommender",
    "lightfm": "recsys.lightfm_hybrid:LightFMRecommender",
    "als": "recsys.als:ALSRecommender",
    "bpr": "recsys.bpr:BPRRecommender",
    "item_knn": "recsys.item_knn:ItemKNNRecommender",
    "blend": "recsys.blend:BlendRecommender",
}


class NotFittedError(MissingStepError, RuntimeError):
    """The recommender was asked to score before ``fit`` (or ``load``)."""


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit BLAS to one thread: implicit parallelizes itself and warns otherwise."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@dataclass(frozen=True)
class Contributions:
    """Why each item scored as it did: the features with the largest contributions.

    Attributes:
        items: (n_states, k) int64, the explained item indices.
        features: (n_states, k, r) int64 feature indices, -1 where there is none.
        values: (n_states, k, r) float32 contributions to the item's score (descending).
    """

    items: IndexMatrix
    features: IndexMatrix
    values: FloatMatrix


class Recommender(ABC):
    """Abstract base: the contract every recommender of this package fulfils.

    Subclasses implement ``_fit``, ``_score``, ``_embed``, ``_arrays`` and
    ``_restore``; they may implement ``_pair_contributions`` to explain scores.
    ``personalized`` is False for models whose scores ignore the state.
    """

    name: ClassVar[str]
    personalized: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        defaults = self.default_params()
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise TypeError(f"{self.name}: unknown parameters {unknown}; known: {sorted(defaults)}")
        self.params: dict[str, Any] = {**defaults, **params}
        self.vocab: Vocabulary | None = None

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        """Every hyperparameter with its default value (JSON-serializable)."""
        return {}

    # ------------------------------------------------------------------ public API

    def fit(self, train: PatientStates) -> Self:
        """Learn from train states and their targets; returns ``self``.

        Args:
            train: states with targets (``train.targets`` is (n_states, n_items) 0/1).
        """
        train.require_targets()
        if len(train) == 0:
            raise ValueError("cannot fit on zero states")
        self.vocab = train.vocab
        self._fit(train)
        return self

    def score(self, states: PatientStates) -> FloatMatrix:
        """Scores of every vocabulary item for every state.

        Returns: (n_states, n_items) float32, finite; row order = ``states.keys``.
        """
        self._check(states)
        scores = np.asarray(self._score(states), dtype=np.float32)
        return scores.reshape(len(states), states.n_items)

    def embed(self, states: PatientStates) -> FloatMatrix:
        """The model's representation of each state, for cosine similarity.

        Returns: (n_states, dim) float32; ``dim`` is fixed for a fitted model.
        """
        self._check(states)
        return np.asarray(self._embed(states), dtype=np.float32)

    @property
    def explains(self) -> bool:
        """Whether :meth:`contributions` can say which features drive a score."""
        return type(self)._pair_contributions is not Recommender._pair_contributions

    def contributions(
        self,
        states: PatientStates,
        items: IndexMatrix,
        n_reasons: int = 3,
        *,
        positive_only: bool = True,
        chunk_size: int = 1024,
    ) -> Contributions | None:
        """The ``n_reasons`` features contributing most to each (state, item) score.

        Args:
            states: n states.
            items: (n, k) item indices to explain, e.g. each state's top-k.
            n_reasons: how many features to keep per (state, item), largest first.
            positive_only: keep only features that raise the score (the reasons);
                False keeps negative ones too (their sum plus the model's
                feature-free part is the score).
        Returns: :class:`Contributions`, or None when the model cannot attribute scores.
        """
        self._check(states)
        if not self.explains:
            return None
        items = np.asarray(items, dtype=np.int64)
        n, k = items.shape
        out_f = np.full((n, k, n_reasons), -1, dtype=np.int64)
        out_v = np.zeros((n, k, n_reasons), dtype=np.float32)
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            chunk = states.subset(np.arange(start, stop))
            values = self._pair_contributions(chunk, items[start:stop])
            f, v = _top_per_row(chunk.features, values, n_reasons, positive_only)
            out_f[start:stop], out_v[start:stop] = f, v
        return Contributions(items, out_f, out_v)

    def save(self, path: Path | str) -> Path:
        """Write the fitted model into folder ``path`` (replaced whole, atomically); returns it."""
        if self.vocab is None:
            raise NotFittedError(f"{self.name} is not fitted")
        folder = Path(path)
        meta = {
            "name": self.name,
            "format_version": FORMAT_VERSION,
            "params": self.params,
            "vocabulary_fingerprint": self.vocab.fingerprint,
        }
        # written whole beside the old folder, then swapped in (with the step's other
        # files inside a workspace transaction): a kill never leaves half a model
        with publishing_dir(folder) as new:
            (new / "recommender.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            (new / "vocabulary.json").write_text(json.dumps(self.vocab.to_json()))
            np.savez(new / "arrays.npz", **self._arrays())  # type: ignore[arg-type]
            self._save_extra(new)
        return folder

    @classmethod
    def load(cls, path: Path | str) -> Self:
        """Read a model written by :meth:`save` (the class must match)."""
        folder = Path(path)
        meta = json.loads((folder / "recommender.json").read_text())
        if meta["name"] != cls.name:
            raise ValueError(f"{folder} holds a {meta['name']!r} model, not {cls.name!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder}: unsupported format version {meta.get('format_version')}")
        vocab = Vocabulary.from_json(json.loads((folder / "vocabulary.json").read_text()))
        if vocab.fingerprint != meta["vocabulary_fingerprint"]:
            raise ValueError(f"{folder}: vocabulary does not match the model")
        model = cls(**meta["params"])
        model.vocab = vocab
        with np.load(folder / "arrays.npz", allow_pickle=False) as data:
            arrays: ArrayDict = {key: data[key] for key in data.files}
        model._restore(arrays, folder)
        return model

    # ------------------------------------------------------------------ for subclasses

    @abstractmethod
    def _fit(self, train: PatientStates) -> None: ...

    @abstractmethod
    def _score(self, states: PatientStates) -> FloatMatrix: ...

    @abstractmethod
    def _embed(self, states: PatientStates) -> FloatMatrix: ...

    @abstractmethod
    def _arrays(self) -> ArrayDict: ...

    @abstractmethod
    def _restore(self, arrays: ArrayDict, folder: Path) -> None: ...

    def _save_extra(self, folder: Path) -> None:  # noqa: B027 (an optional hook)
        """Hook for models that save more than arrays (e.g. components)."""

    def _pair_contributions(self, states: PatientStates, items: IndexMatrix) -> FloatMatrix:
        """Contribution of every stored feature value of ``states.features`` (m rows, in CSR
        order) to the score of each of the row's ``items`` (m, k): (nnz, k) float32."""
        raise NotImplementedError

    def _check(self, states: PatientStates) -> None:
        if self.vocab is None:
            raise NotFittedError(f"{self.name} is not fitted: call fit() or load() first")
        if states.vocab.fingerprint != self.vocab.fingerprint:
            raise ValueError(
                f"{self.name}: states were built with vocabulary {states.vocab.fingerprint}, "
                f"the model with {self.vocab.fingerprint}; build them with the model's vocab"
            )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({params})"


def _top_per_row(
    chunk: SparseMatrix, values: FloatMatrix, r: int, positive_only: bool
) -> tuple[IndexMatrix, FloatMatrix]:
    """Per (row, item): the r stored features with the largest contributions (descending)."""
    m = chunk.shape[0]
    k = values.shape[1] if values.ndim == 2 else 0
    out_f = np.full((m, k, r), -1, dtype=np.int64)
    out_v = np.zeros((m, k, r), dtype=np.float32)
    if chunk.nnz == 0 or k == 0:
        return out_f, out_v
    lengths = np.diff(chunk.indptr)
    width = int(lengths.max())
    rows = np.repeat(np.arange(m), lengths)
    pos = np.arange(chunk.nnz) - chunk.indptr[rows]
    padded = np.full((m, k, width), -np.inf, dtype=np.float32)
    padded[rows, :, pos] = values
    cols = np.full((m, width), -1, dtype=np.int64)
    cols[rows, pos] = chunk.indices
    take = min(r, width)
    if take <= 8:
        # a few argmax passes beat a partition; ties go to the earlier feature position
        slot_list, value_list = [], []
        for _ in range(take):
            best = np.argmax(padded, axis=2)[:, :, None]
            slot_list.append(best)
            value_list.append(np.take_along_axis(padded, best, axis=2))
            np.put_along_axis(padded, best, -np.inf, axis=2)
        slots = np.concatenate(slot_list, axis=2)
        top_v = np.concatenate(value_list, axis=2)
    else:
        slots = np.argpartition(-padded, take - 1, axis=2)[:, :, :take]
        top_v = np.take_along_axis(padded, slots, axis=2)
        # descending, ties by feature position (deterministic)
        order = np.lexsort((slots, -top_v), axis=-1)
        slots = np.take_along_axis(slots, order, axis=2)
        top_v = np.take_along_axis(top_v, order, axis=2)
    top_f = cols[np.arange(m)[:, None, None], slots]
    valid = np.isfinite(top_v) & ((top_v > 0) if positive_only else True)
    out_f[:, :, :take] = np.where(valid, top_f, -1)
    out_v[:, :, :take] = np.where(valid, top_v, 0.0)
    return out_f, out_v


def feature_rows(features: SparseMatrix) -> npt.NDArray[np.int64]:
    """Row index of every stored value of a CSR matrix (length nnz)."""
    return np.repeat(np.arange(features.shape[0], dtype=np.int64), np.diff(features.indptr))


def row_normalize(matrix: SparseMatrix, norm: str) -> SparseMatrix:
    """Scale each row to unit ``l1`` or ``l2`` norm (``none``: unchanged); float32 CSR."""
    out = matrix.astype(np.float32).tocsr(copy=True)
    if norm == "none":
        return out
    if norm == "l1":
        totals = np.asarray(abs(out).sum(axis=1)).ravel()
    elif norm == "l2":
        totals = np.sqrt(np.asarray(out.multiply(out).sum(axis=1)).ravel())
    else:
        raise ValueError(f"unknown norm {norm!r}")
    totals[totals == 0] = 1.0
    out.data /= np.repeat(totals, np.diff(out.indptr)).astype(np.float32)
    return out


def pack_sparse(prefix: str, matrix: SparseMatrix) -> ArrayDict:
    """A CSR matrix as arrays for ``np.savez``."""
    m = matrix.tocsr()
    return {
        f"{prefix}__data": m.data,
        f"{prefix}__indices": m.indices,
        f"{prefix}__indptr": m.indptr,
        f"{prefix}__shape": np.asarray(m.shape, dtype=np.int64),
    }


def unpack_sparse(prefix: str, arrays: Mapping[str, npt.NDArray[Any]]) -> SparseMatrix:
    shape = tuple(int(x) for x in arrays[f"{prefix}__shape"])
    return sp.csr_matrix(
        (arrays[f"{prefix}__data"], arrays[f"{prefix}__indices"], arrays[f"{prefix}__indptr"]),
        shape=shape,
    )


def recommender_class(name: str) -> type[Recommender]:
    """The class registered under ``name`` (see :data:`RECOMMENDERS`)."""
    try:
        target = RECOMMENDERS[name]
    except KeyError:
        raise ValueError(f"unknown recommender {name!r}; known: {sorted(RECOMMENDERS)}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Recommender)):
        raise TypeError(f"{target} is not a Recommender")
    return cls


def make_recommender(name: str, **params: Any) -> Recommender:
    """A new, unfitted recommender: ``make_recommender("lightfm", no_components=32)``."""
    return recommender_class(name)(**params)


def load_recommender(path: Path | str) -> Recommender:
    """Load any saved recommender; the folder says which class it is."""
    meta = json.loads((Path(path) / "recommender.json").read_text())
    return recommender_class(meta["name"]).load(path)
