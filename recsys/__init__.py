"""Recommenders over patient states: interactions, models, self/peer signals, metrics.

The main entry points::

    from recsys import CohortTables, build_dataset, make_recommender
    states = build_dataset(CohortTables.from_workspace("pmlm-workspace"))
    model = make_recommender("lightfm").fit(states.split("train"))

Model implementations are imported lazily by :func:`make_recommender`.
"""

from recsys.base import (
    Contributions,
    NotFittedError,
    Recommender,
    load_recommender,
    make_recommender,
)
from recsys.interactions import (
    CohortTables,
    PatientStates,
    StateSettings,
    Vocabulary,
    bootstrap_states,
    build_dataset,
    build_states,
)
from recsys.signals import PeerSignals, SelfSignals, peer_signals, self_signals, signal_batches

__all__ = [
    "CohortTables",
    "Contributions",
    "NotFittedError",
    "PatientStates",
    "PeerSignals",
    "Recommender",
    "SelfSignals",
    "StateSettings",
    "Vocabulary",
    "bootstrap_states",
    "build_dataset",
    "build_states",
    "load_recommender",
    "make_recommender",
    "peer_signals",
    "self_signals",
    "signal_batches",
]
