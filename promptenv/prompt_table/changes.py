"""What changed since the prompt table was last built, and whom it affects.

A patient is recomputed when her records changed (added, edited or removed
rows), when her recommender state changed, or when her peers may have changed
(`recsys.peers.peers_may_change`). Everyone is recomputed when there is no
previous build, when the recommender or the prompt settings changed, or when the
prompt table was replaced since.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipelines.export import file_sha256
from pipelines.fingerprint import ChangedPatients, matrix_row_hashes, row_hashes
from pipelines.workspace import Workspace
from promptenv.prompt_table.build import PROMPT_TABLE
from promptenv.prompt_table.spec import PromptTableSpec, refresh_dir
from recsys.interactions import STATE_KEY_COLUMNS, PatientStates
from recsys.peers import peers_may_change
from recsys.signals import SignalSettings


@dataclass(frozen=True)
class Previous:
    build: dict[str, Any]
    patients: pd.DataFrame
    states: pd.DataFrame
    queries: pd.DataFrame


def read_previous(workspace: Workspace) -> Previous | None:
    folder = refresh_dir(workspace)
    files = [folder / n for n in ("build.json", "patients.parquet", "states.parquet")]
    files.append(folder / "queries.parquet")
    if not all(f.exists() for f in files):
        return None
    return Previous(
        build=json.loads(files[0].read_text()),
        patients=pd.read_parquet(files[1]),
        states=pd.read_parquet(files[2]),
        queries=pd.read_parquet(files[3]),
    )


def full_recompute_reason(
    workspace: Workspace,
    previous: Previous | None,
    spec: PromptTableSpec,
    model_fp: str,
    full: bool,
) -> str | None:
    if full:
        return "asked"
    if previous is None:
        return "no previous build in this workspace"
    if previous.build.get("spec") != spec.identity():
        return "the prompt settings changed"
    if previous.build.get("model_fingerprint") != model_fp:
        return "the recommender changed"
    path = workspace.table_path(PROMPT_TABLE)
    if not path.exists():
        return f"{path} is missing"
    if file_sha256(path) != previous.build.get("table_sha256"):
        return f"{path} was replaced since the last build"
    return None


def affected_patients(
    changes: ChangedPatients,
    previous: Previous,
    states: pd.DataFrame,
    embeddings: np.ndarray,
    chosen: pd.DataFrame,
    settings: SignalSettings,
) -> tuple[set[str], set[str], set[str]]:
    """Patients to recompute because of their records, their states, their peers."""
    by_record = set(changes.changed)
    old = previous.states.set_index("encounter_id")
    new = states.assign(row=np.arange(len(states))).set_index("encounter_id")
    common = new.index.intersection(old.index)
    same = pd.Series(False, index=new.index)
    same[common] = new.loc[common, "state_hash"].to_numpy() == old.loc[common, "state_hash"]
    new_changed = new[~same.to_numpy()]
    old_changed = old[~old.index.isin(new.index[same.to_numpy()])]
    by_state = set(new_changed["patient_id"]) | set(old_changed["patient_id"])

    # the other patients' prompt-table encounters, with the peers stored for them
    stored = previous.queries.set_index("encounter_id")
    mine = chosen[~chosen["patient_id"].isin(by_record | by_state)]
    missing = mine[~mine["encounter_id"].isin(stored.index)]
    by_peers = set(missing["patient_id"])
    mine = mine[mine["encounter_id"].isin(stored.index)]
    if mine.empty:
        return by_record, by_state, by_peers
    q = new.loc[mine["encounter_id"]]
    q_patient = q["patient_id"].to_numpy()
    q_index = q["index_us"].to_numpy()
    info = stored.loc[mine["encounter_id"]]
    affected = np.zeros(len(q), dtype=bool)

    # the state through which a peer of hers was found changed or is gone
    gone = set(old_changed.index[old_changed["split"] == "train"])
    if gone:
        peer_states = info["peer_encounter_ids"].to_numpy()
        affected |= np.array([not gone.isdisjoint(ids) for ids in peer_states], dtype=bool)

    # a changed or new training state may enter her peers (`recsys.peers.peers_may_change`)
    came = new_changed[new_changed["split"] == "train"]
    if len(came):
        affected |= peers_may_change(
            embeddings[q["row"].to_numpy()],
            q_patient,
            q_index,
            info["kth_similarity"].to_numpy(dtype=np.float64),
            info["n_peers"].to_numpy() < settings.n_peers,
            embeddings[came["row"].to_numpy()],
            came["patient_id"].to_numpy(),
            came["next_us"].to_numpy(),
        )

    by_peers |= set(q_patient[affected])
    return by_record, by_state, by_peers


def state_hashes(states: PatientStates, embeddings: np.ndarray) -> pd.DataFrame:
    """One row per state: keys and a hash of everything the signals read of it."""
    assert states.targets is not None
    parts = pd.DataFrame(
        {
            "keys": row_hashes(states.keys[list(STATE_KEY_COLUMNS)]),
            "features": matrix_row_hashes(states.features),
            "history": matrix_row_hashes(states.history),
            "last_plan": matrix_row_hashes(states.last_plan),
            "targets": matrix_row_hashes(states.targets),
            "embedding": matrix_row_hashes(embeddings),
        }
    )
    keys = states.keys
    return pd.DataFrame(
        {
            "encounter_id": keys["encounter_id"].astype(str).to_numpy(),
            "patient_id": keys["patient_id"].astype(str).to_numpy(),
            "split": keys["split"].astype(str).to_numpy(),
            "index_us": keys["index_us"].to_numpy(dtype=np.int64),
            "next_us": keys["next_us"].to_numpy(dtype=np.int64),
            "state_hash": pd.util.hash_pandas_object(parts, index=False).to_numpy(np.uint64),
        }
    )
