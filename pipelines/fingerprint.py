"""Fingerprints: which patients' records changed between two ingests, and cohort-level hashes.

A patient's **record fingerprint** is a hash of every row that carries her
``patient_id`` in the canonical tables (patients, encounters, events, notes,
reference plans, plan items, index encounters), all columns included, row order
ignored. Two ingests of the same records give the same fingerprint; any added,
removed or edited row of hers changes it. The nightly refresh compares the
fingerprints stored with the last prompt table to today's to find the patients
whose prompts must be recomputed (see `promptenv.refresh`).

Hashes use ``pandas.util.hash_pandas_object`` (fixed key, so stable across
processes); a pandas upgrade that changed it would make every patient look
changed once, which costs a full recompute, never a missed change.

Usage::

    before = patient_fingerprints(load_tables(ws))
    ...  # re-ingest
    changes = compare_fingerprints(before, patient_fingerprints(load_tables(ws)))
    changes.added, changes.modified, changes.removed

`code_fingerprint` hashes the code itself (the pmlm version and the packages'
source), for the cache keys of the Prefect tasks.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from pipelines.schemas import PATIENT_TABLES

FINGERPRINT_COLUMNS = ("patient_id", "fingerprint")

Hashes = npt.NDArray[np.uint64]


def row_hashes(frame: pd.DataFrame) -> Hashes:
    """One uint64 per row from every column's value (column order does not matter)."""
    if frame.empty:
        return np.zeros(0, dtype=np.uint64)
    ordered = frame[sorted(frame.columns)]
    return pd.util.hash_pandas_object(ordered, index=False).to_numpy(dtype=np.uint64)


def mix64(values: npt.ArrayLike) -> Hashes:
    """The splitmix64 finalizer: spreads each uint64 over all 64 bits (vectorized)."""
    x = np.asarray(values, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def matrix_row_hashes(matrix: sp.spmatrix | sp.sparray | npt.NDArray[np.floating]) -> Hashes:
    """One uint64 per row of a sparse (CSR) or dense float matrix: its columns and exact values.

    Equal rows (same non-zero columns, bit-identical values) give equal hashes,
    whatever the other rows hold.
    """
    if sp.issparse(matrix):
        # a copy of every array: the in-place clean-up below must not touch the caller's
        # matrix (a dtype cast alone may share its index arrays)
        csr = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
        csr.sum_duplicates()
        csr.eliminate_zeros()
        cols = csr.indices.astype(np.uint64)
        bits = csr.data.view(np.uint64)
        per_entry = mix64(mix64(cols + np.uint64(1)) ^ bits)
        counts = np.diff(csr.indptr)
    else:
        dense = np.ascontiguousarray(np.asarray(matrix, dtype=np.float64))
        n, width = dense.shape
        cols = np.tile(np.arange(width, dtype=np.uint64), n)
        per_entry = mix64(mix64(cols + np.uint64(1)) ^ dense.reshape(-1).view(np.uint64))
        counts = np.full(n, width, dtype=np.int64)
    rows = np.repeat(np.arange(len(counts)), counts)
    out = np.zeros(len(counts), dtype=np.uint64)
    np.add.at(out, rows, per_entry)
    return mix64(out ^ mix64(counts.astype(np.uint64)))


def combine_by_key(keys: pd.Series, hashes: Hashes) -> pd.DataFrame:
    """Order-free combination of row hashes per key: columns ``n`` and ``hash`` (uint64)."""
    frame = pd.DataFrame({"key": keys.to_numpy(), "hash": mix64(hashes)})
    grouped = frame.groupby("key", sort=True)["hash"]
    return pd.DataFrame({"n": grouped.size(), "hash": grouped.sum().astype(np.uint64)})


def patient_fingerprints(
    tables: Mapping[str, pd.DataFrame], names: Iterable[str] = PATIENT_TABLES
) -> pd.DataFrame:
    """One row per patient with rows in any of ``names``: ``patient_id``, ``fingerprint`` (16 hex).

    Sorted by ``patient_id``. Raises KeyError naming a table that is missing.
    """
    parts = []
    for name in names:
        if name not in tables:
            raise KeyError(f"table {name!r} is needed for patient fingerprints but was not given")
        frame = tables[name]
        combined = combine_by_key(frame["patient_id"].astype(str), row_hashes(frame))
        parts.append(combined.add_prefix(f"{name}:"))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=str) for c in FINGERPRINT_COLUMNS})
    patients = parts[0].index
    for part in parts[1:]:
        patients = patients.union(part.index)
    # each table contributes its count and hash sum; a table without her rows contributes
    # zeros (reindexed with an integer fill: a NaN would turn the uint64 sums into floats)
    wide = pd.concat([part.reindex(patients, fill_value=0) for part in parts], axis=1)
    digest = pd.util.hash_pandas_object(wide.astype(np.uint64), index=False).to_numpy()
    return pd.DataFrame(
        {
            "patient_id": wide.index.astype(str),
            "fingerprint": [f"{int(d):016x}" for d in digest],
        }
    ).reset_index(drop=True)


def cohort_fingerprint(fingerprints: pd.DataFrame) -> str:
    """One hash (16 hex) of all patients' fingerprints: equal cohorts, equal hashes."""
    h = hashlib.sha256()
    for row in fingerprints.sort_values("patient_id").itertuples(index=False):
        h.update(f"{row.patient_id}\x1f{row.fingerprint}\x1e".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ChangedPatients:
    """Patients whose records differ between two fingerprint tables (sorted ids)."""

    added: tuple[str, ...]
    modified: tuple[str, ...]
    removed: tuple[str, ...]
    unchanged: int

    @property
    def changed(self) -> tuple[str, ...]:
        """Patients present now whose records are new or different."""
        return tuple(sorted((*self.added, *self.modified)))

    @property
    def any(self) -> bool:
        return bool(self.added or self.modified or self.removed)

    def as_dict(self) -> dict[str, int]:
        return {
            "added": len(self.added),
            "modified": len(self.modified),
            "removed": len(self.removed),
            "unchanged": self.unchanged,
        }


def compare_fingerprints(before: pd.DataFrame, after: pd.DataFrame) -> ChangedPatients:
    """Which patients were added, modified or removed from ``before`` to ``after``."""
    old = dict(zip(before["patient_id"], before["fingerprint"], strict=True))
    new = dict(zip(after["patient_id"], after["fingerprint"], strict=True))
    added = sorted(p for p in new if p not in old)
    removed = sorted(p for p in old if p not in new)
    modified = sorted(p for p in new if p in old and old[p] != new[p])
    unchanged = sum(1 for p in new if p in old and old[p] == new[p])
    return ChangedPatients(tuple(added), tuple(modified), tuple(removed), unchanged)


def files_fingerprint(root: Path) -> str:
    """A hash (16 hex) of every file under ``root``: relative names and bytes.

    Raises FileNotFoundError when ``root`` does not exist.
    """
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\x1f")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


#: The packages whose code decides what a cached task returns.
CODE_PACKAGES = ("pipelines", "recsys", "promptenv", "flows")
#: Source files whose bytes are code (Python, and the price table the LLM client reads).
_CODE_SUFFIXES = (".py", ".toml")


@functools.cache
def code_fingerprint(packages: tuple[str, ...] = CODE_PACKAGES) -> str:
    """The installed pmlm version and a hash (16 hex) of the source of ``packages``.

    Part of every cache key of the Prefect tasks (`flows.tasks`): an upgrade, or
    any edit of the code, never reuses a result the old code computed. Computed
    once per process (about 10 ms).
    """
    h = hashlib.sha256()
    try:
        h.update(importlib.metadata.version("pmlm").encode())
    except importlib.metadata.PackageNotFoundError:
        h.update(b"not installed")
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"package {name!r} is not importable: reinstall pmlm")
        root = Path(spec.origin).parent
        h.update(name.encode() + b"\x1e")
        for path in sorted(p for p in root.rglob("*") if p.suffix in _CODE_SUFFIXES):
            h.update(path.relative_to(root).as_posix().encode() + b"\x1f")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]
