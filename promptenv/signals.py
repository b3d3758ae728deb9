"""The recommender's signals for the encounters a prompt is built for.

Loads the workspace's selected recommender (`pmlm recsys fit` chooses it on
validation patients), computes self-informed predictions and peer-informed
patterns for the requested index encounters (peers from TRAIN patients only,
`recsys.signals.encounter_signals`), and returns one `PatientSignals` per
encounter (`signals_by_encounter`, which the prompt table's batches use too).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.workspace import Workspace
from promptenv.fragments import PatientSignals, patient_signals_by_encounter
from recsys.interactions import CohortTables, build_states
from recsys.peers import PeerSignals
from recsys.signals import SelfSignals, SignalSettings, encounter_signals
from recsys.steps import load_fitted, selected_model_name


def signals_by_encounter(
    own: SelfSignals,
    peers: PeerSignals,
    encounter_ids: Sequence[str],
    model: str,
    min_support: int,
) -> dict[str, PatientSignals]:
    """One `PatientSignals` per requested encounter (empty ones where the frames have none)."""
    found = patient_signals_by_encounter(
        own.items, own.reasons, peers.statements, peers.peers, model=model, min_support=min_support
    )
    empty = PatientSignals(model=model, min_support=min_support)
    return {e: found.get(e, empty) for e in encounter_ids}


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
    model = load_fitted(workspace, name)
    assert model.vocab is not None
    tables = tables or CohortTables.from_workspace(workspace)
    states = build_states(tables, model.vocab)
    wanted = states.keys["encounter_id"].isin(set(encounter_ids)).to_numpy()
    own, peers = encounter_signals(model, states.subset(wanted), states.split("train"), settings)
    return signals_by_encounter(own, peers, encounter_ids, name, settings.min_support)


__all__ = ["SignalSettings", "selected_model_name", "signals_by_encounter", "signals_for"]
