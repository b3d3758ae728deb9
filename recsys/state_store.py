"""Recommender states on disk: a `PatientStates` and its embeddings, saved and loaded together.

The prompt table's plan computes every state and embedding once and saves them
in its run folder; each batch loads them (a batch may run in another process).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipelines.errors import MissingStepError
from recsys.interactions import PatientStates, Vocabulary
from recsys.type_aliases import FloatMatrix

_MATRICES = ("features", "history", "last_plan", "targets")


def save_states(folder: Path, states: PatientStates, embeddings: FloatMatrix) -> None:
    """Write ``states`` (keys, sparse matrices, n_true) and ``embeddings`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".keys.parquet.tmp"
    states.keys.to_parquet(tmp, index=False)
    tmp.replace(folder / "keys.parquet")
    for name in _MATRICES:
        sp.save_npz(folder / f"{name}.npz", sp.csr_matrix(getattr(states, name)), compressed=False)
    np.save(folder / "n_true.npy", np.asarray(states.n_true))
    np.save(folder / "embeddings.npy", np.asarray(embeddings, dtype=np.float32))


def load_states(folder: Path, vocab: Vocabulary) -> tuple[PatientStates, FloatMatrix]:
    """The states and embeddings `save_states` wrote in ``folder`` (with ``vocab``)."""
    if not (folder / "embeddings.npy").exists():
        raise MissingStepError(
            f"{folder} holds no recommender states: plan the prompt table again "
            "(its run folder is deleted once the table is written)"
        )
    matrices = {name: sp.load_npz(folder / f"{name}.npz").tocsr() for name in _MATRICES}
    states = PatientStates(
        keys=pd.read_parquet(folder / "keys.parquet"),
        features=matrices["features"],
        history=matrices["history"],
        last_plan=matrices["last_plan"],
        targets=matrices["targets"],
        n_true=np.load(folder / "n_true.npy"),
        vocab=vocab,
    )
    return states, np.load(folder / "embeddings.npy")
