"""The recommender's signals for the encounters a prompt is built for.

Loads the workspace's selected recommender (`pmlm recsys fit` chooses it on
validation patients), computes self-informed predictions and peer-informed
patterns for the requested index encounters (peers from TRAIN patients only),
and returns one `PatientSignals` per encounter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipelines.workspace import Workspace
from promptenv.fragments import PatientSignals, patient_signals_by_encounter
from recsys.base import load_recommender
from recsys.interactions import CohortTables, build_states
from recsys.signals import peer_signals, self_signals
from recsys.steps import models_dir, read_selection


@dataclass(frozen=True)
class SignalSettings:
    """How many items and peers the signals carry (prompts list fewer)."""

    k_self: int = 15
    n_reasons: int = 3
    n_peers: int = 20
    min_support: int = 5
    max_statements: int = 15


def selected_model_name(workspace: Workspace) -> str:
    """The recommender that `pmlm recsys fit` selected on validation patients."""
    name = read_selection(workspace).get("best")
    if name is None:
        raise FileNotFoundError(
            f"no fitted recommender in {models_dir(workspace)}: run `pmlm recsys fit` first"
        )
    return str(name)


def signals_for(
    workspace: Workspace,
    encounter_ids: Sequence[str],
    settings: SignalSettings | None = None,
    model_name: str | None = None,
    tables: CohortTables | None = None,
) -> dict[str, PatientSignals]:
    """Self and peer signals of each requested index encounter (missing ones get empty signals)."""
    settings = settings or SignalSettings()
    name = model_name or selected_model_name(workspace)
    model = load_recommender(models_dir(workspace) / name)
    if model.vocab is None:
        raise ValueError(f"recommender {name} has no vocabulary: refit it with `pmlm recsys fit`")
    tables = tables or CohortTables.from_workspace(workspace)
    states = build_states(tables, model.vocab)
    wanted = states.keys["encounter_id"].isin(set(encounter_ids)).to_numpy()
    queries = states.subset(wanted)
    own = self_signals(model, queries, k=settings.k_self, n_reasons=settings.n_reasons)
    peers = peer_signals(
        model,
        queries,
        states.split("train"),
        k=settings.n_peers,
        min_support=settings.min_support,
        max_statements=settings.max_statements,
    )
    found = patient_signals_by_encounter(
        own.items,
        own.reasons,
        peers.statements,
        peers.peers,
        model=name,
        min_support=settings.min_support,
    )
    empty = PatientSignals(model=name, min_support=settings.min_support)
    return {e: found.get(e, empty) for e in encounter_ids}
