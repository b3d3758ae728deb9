"""Patient states and their columns: settings, vocabulary, the aligned matrices, the tables.

The types every recommender of this package reads; how the matrices are built is
in :mod:`recsys.interactions` (which re-exports these names).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipelines.workspace import Workspace
from recsys.type_aliases import IndexVector, Mask, SparseMatrix

US_PER_DAY = 86_400_000_000
#: Stand-in for a missing end time: the interval never ends.
NEVER = np.iinfo(np.int64).max

#: Columns of :attr:`PatientStates.keys`.
STATE_KEY_COLUMNS = (
    "encounter_id",
    "patient_id",
    "index_time",
    "next_encounter_id",
    "next_time",
    "split",
    "is_obstetric",
    "is_adult",
    "age_years",
    "index_us",
    "next_us",
)


@dataclass(frozen=True)
class StateSettings:
    """How states are turned into features; saved in the vocabulary with the model."""

    history_half_life_days: float = 365.0
    recent_days: float = 365.0
    age_band_years: int = 5
    #: an item enters the vocabulary when at least this many TRAIN patients had it in a plan
    min_item_patients: int = 1
    #: a feature enters the vocabulary when at least this many TRAIN states have it
    min_feature_states: int = 2
    #: bound on the (state, event-time) pairs materialized at once
    max_pairs_per_chunk: int = 4_000_000


@dataclass(frozen=True)
class Vocabulary:
    """Item and feature columns, with human-readable labels, fixed at fit time."""

    items: tuple[str, ...]
    item_displays: tuple[str, ...]
    item_kinds: tuple[str, ...]
    features: tuple[str, ...]
    feature_displays: tuple[str, ...]
    settings: StateSettings = field(default_factory=StateSettings)

    def __post_init__(self) -> None:
        if not (len(self.items) == len(self.item_displays) == len(self.item_kinds)):
            raise ValueError("items, item_displays and item_kinds must have the same length")
        if len(self.features) != len(self.feature_displays):
            raise ValueError("features and feature_displays must have the same length")

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def fingerprint(self) -> str:
        """A short hash of the columns and settings: equal fingerprints mean same matrices."""
        digest = hashlib.sha256()
        digest.update("\x1f".join(self.items).encode())
        digest.update(b"\x1e")
        digest.update("\x1f".join(self.features).encode())
        digest.update(json.dumps(asdict(self.settings), sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def item_index(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.items)}

    def feature_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.features)}

    def to_json(self) -> dict[str, Any]:
        return {
            "items": list(self.items),
            "item_displays": list(self.item_displays),
            "item_kinds": list(self.item_kinds),
            "features": list(self.features),
            "feature_displays": list(self.feature_displays),
            "settings": asdict(self.settings),
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Vocabulary:
        vocab = cls(
            items=tuple(data["items"]),
            item_displays=tuple(data["item_displays"]),
            item_kinds=tuple(data["item_kinds"]),
            features=tuple(data["features"]),
            feature_displays=tuple(data["feature_displays"]),
            settings=StateSettings(**data.get("settings", {})),
        )
        if "fingerprint" in data and data["fingerprint"] != vocab.fingerprint:
            raise ValueError("vocabulary file is inconsistent with its fingerprint")
        return vocab


@dataclass(frozen=True)
class PatientStates:
    """Patient states (one per index encounter) as aligned sparse matrices.

    Attributes:
        keys: one row per state (``STATE_KEY_COLUMNS``); ``index_us``/``next_us`` are
            the index and next-encounter times in int64 microseconds since the epoch.
        features: (n_states, n_features) float32 CSR.
        history: (n_states, n_items) float32 CSR, decayed item counts before ``index_time``.
        last_plan: (n_states, n_items) float32 CSR, 0/1.
        targets: (n_states, n_items) float32 CSR 0/1, or None for states without a next plan.
        n_true: (n_states,) int64, distinct next-plan items including those outside the
            vocabulary (the recall denominator), or None.
        vocab: the columns.
    """

    keys: pd.DataFrame
    features: SparseMatrix
    history: SparseMatrix
    last_plan: SparseMatrix
    targets: SparseMatrix | None
    n_true: IndexVector | None
    vocab: Vocabulary

    def __post_init__(self) -> None:
        n = len(self.keys)
        shapes = {
            "features": (self.features.shape, (n, self.vocab.n_features)),
            "history": (self.history.shape, (n, self.vocab.n_items)),
            "last_plan": (self.last_plan.shape, (n, self.vocab.n_items)),
        }
        if self.targets is not None:
            shapes["targets"] = (self.targets.shape, (n, self.vocab.n_items))
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise ValueError(f"{name} has shape {got}, expected {want}")
        if (self.targets is None) != (self.n_true is None):
            raise ValueError("targets and n_true go together")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_items(self) -> int:
        return self.vocab.n_items

    @property
    def n_features(self) -> int:
        return self.vocab.n_features

    def require_targets(self) -> tuple[SparseMatrix, IndexVector]:
        """The targets and ``n_true``; ValueError when these states have none."""
        if self.targets is None or self.n_true is None:
            raise ValueError("these patient states have no targets (next-plan items)")
        return self.targets, self.n_true

    def subset(self, rows: IndexVector | Mask | Sequence[int]) -> PatientStates:
        """The states at ``rows`` (positions or a boolean mask), in that order."""
        index = np.asarray(rows)
        if index.dtype == np.bool_:
            index = np.flatnonzero(index)
        index = index.astype(np.int64)
        return PatientStates(
            keys=self.keys.iloc[index].reset_index(drop=True),
            features=_rows(self.features, index),
            history=_rows(self.history, index),
            last_plan=_rows(self.last_plan, index),
            targets=None if self.targets is None else _rows(self.targets, index),
            n_true=None if self.n_true is None else self.n_true[index],
            vocab=self.vocab,
        )

    def split(self, name: str) -> PatientStates:
        """The states of one patient split (``train``, ``validation`` or ``test``)."""
        return self.subset((self.keys["split"] == name).to_numpy())

    @property
    def obstetric(self) -> Mask:
        return self.keys["is_obstetric"].to_numpy(dtype=bool)


def _rows(matrix: SparseMatrix, index: IndexVector) -> SparseMatrix:
    out: SparseMatrix = matrix[index]
    out.sort_indices()
    return out


@dataclass(frozen=True)
class CohortTables:
    """The canonical tables the states are built from (pandas frames, as read)."""

    index_encounters: pd.DataFrame
    plan_items: pd.DataFrame
    events: pd.DataFrame
    encounters: pd.DataFrame
    patients: pd.DataFrame

    @classmethod
    def from_frames(cls, frames: Mapping[str, pd.DataFrame]) -> CohortTables:
        return cls(
            index_encounters=frames["index_encounters"],
            plan_items=frames["plan_items"],
            events=frames["events"],
            encounters=frames["encounters"],
            patients=frames["patients"],
        )

    @classmethod
    def from_workspace(cls, workspace: Workspace | Path | str) -> CohortTables:
        ws = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
        names = ("index_encounters", "plan_items", "events", "encounters", "patients")
        return cls.from_frames({name: ws.read_table(name) for name in names})


# --------------------------------------------------------------------------- time


def micros(values: pd.Series, missing: int = NEVER) -> npt.NDArray[np.int64]:
    """UTC timestamps → int64 microseconds since the epoch; missing values → ``missing``."""
    stamps = pd.to_datetime(values, utc=True).dt.as_unit("us")
    out = np.asarray(stamps.array.asi8, dtype=np.int64).copy()
    out[stamps.isna().to_numpy()] = missing
    return out


def bootstrap_states(
    states: PatientStates,
    n_states: int,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> PatientStates:
    """Resample whole patients (with replacement) under new ids until ``n_states`` rows.

    Each drawn patient keeps all her states (times, matrices, targets) and gets a new
    ``patient_id``/``encounter_id`` suffix ``~<copy>`` and a new split, drawn per new
    patient with ``split_fractions``. Used by the scale benchmark.
    """
    rng = np.random.default_rng(seed)
    patient_rows = states.keys.groupby("patient_id", sort=True).indices
    patients = list(patient_rows)
    picks: list[npt.NDArray[np.int64]] = []
    copy_ids: list[npt.NDArray[np.int64]] = []
    total, copy = 0, 0
    while total < n_states:
        batch = rng.integers(0, len(patients), size=max(16, (n_states - total) // 4 + 1))
        for b in batch:
            rows = np.asarray(patient_rows[patients[b]], dtype=np.int64)
            picks.append(rows)
            copy_ids.append(np.full(len(rows), copy, dtype=np.int64))
            copy += 1
            total += len(rows)
            if total >= n_states:
                break
    rows = np.concatenate(picks)[:n_states]
    copies = np.concatenate(copy_ids)[:n_states]
    out = states.subset(rows)
    keys = out.keys.copy()
    suffix = pd.Series(copies).map(lambda c: f"~{c}")
    keys["patient_id"] = keys["patient_id"].astype("str") + suffix
    keys["encounter_id"] = keys["encounter_id"].astype("str") + suffix
    keys["next_encounter_id"] = keys["next_encounter_id"].astype("str") + suffix
    n_copies = int(copies.max()) + 1
    split_of_copy = rng.choice(
        np.array(["train", "validation", "test"]), size=n_copies, p=np.asarray(split_fractions)
    )
    keys["split"] = split_of_copy[copies]
    return PatientStates(
        keys, out.features, out.history, out.last_plan, out.targets, out.n_true, out.vocab
    )
