"""One batch of the prompt table: its signals, then its prompt rows (a batch reads the plan's
files, never another batch's, so a task runner may run batches anywhere)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipelines.errors import StaleStateError
from pipelines.fingerprint import files_fingerprint
from pipelines.workspace import Workspace
from promptenv.policy import load_policy, policy_dir
from promptenv.prompt_table.build import build_prompt_table
from promptenv.prompt_table.spec import (
    BATCH_TABLES,
    QUERY_COLUMNS,
    BatchSignals,
    PromptBatch,
    PromptPlan,
)
from promptenv.signals import signals_by_encounter
from recsys.interactions import PatientStates
from recsys.signals import encounter_signals
from recsys.state_store import load_states
from recsys.steps import load_fitted, models_dir


def batch_signals(plan: PromptPlan, batch: PromptBatch) -> BatchSignals:
    """Self and peer signals of a batch's encounters (peers from TRAIN states only)."""
    ws = Workspace.at(plan.workspace)
    _check_model(ws, plan)
    model = load_fitted(ws, plan.model)
    assert model.vocab is not None
    states, embeddings = load_states(plan.run_dir, model.vocab)
    position = pd.Index(states.keys["encounter_id"].astype(str))
    rows = position.get_indexer(list(batch.encounter_ids))
    if (rows < 0).any():
        raise KeyError(f"batch {batch.index} names encounters that the plan's states lack")
    queries = states.subset(rows)
    pool = np.flatnonzero((states.keys["split"] == "train").to_numpy())
    # one state (one query) at a time: a row's floats never depend on its batch
    own, peers = encounter_signals(
        model,
        queries,
        states.subset(pool),
        plan.spec.settings,
        chunk_size=1,
        query_embeddings=embeddings[rows],
        pool_embeddings=embeddings[pool],
    )
    signals = signals_by_encounter(
        own, peers, batch.encounter_ids, plan.model, plan.spec.settings.min_support
    )
    return BatchSignals(signals, _query_frame(batch, queries, peers.peers))


def _query_frame(batch: PromptBatch, queries: PatientStates, peers: pd.DataFrame) -> pd.DataFrame:
    ordered = peers.sort_values(["encounter_id", "peer_rank"])
    grouped = ordered.groupby("encounter_id", sort=False)
    lists = grouped["peer_encounter_id"].apply(lambda s: [str(e) for e in s])
    kth = grouped["similarity"].min()
    keys = queries.keys.assign(encounter_id=queries.keys["encounter_id"].astype(str))
    out = pd.DataFrame(
        {
            "encounter_id": keys["encounter_id"].to_numpy(),
            "patient_id": keys["patient_id"].astype(str).to_numpy(),
        }
    )
    out["peer_encounter_ids"] = [lists.get(e, []) for e in out["encounter_id"]]
    out["kth_similarity"] = [float(kth.get(e, np.nan)) for e in out["encounter_id"]]
    out["n_peers"] = [len(p) for p in out["peer_encounter_ids"]]
    return out[list(QUERY_COLUMNS)]


def batch_prompts(plan: PromptPlan, batch: PromptBatch, signals: BatchSignals) -> pd.DataFrame:
    """The prompt-table rows of a batch (`promptenv.prompt_table.PROMPTS_SCHEMA` columns)."""
    ws = Workspace.at(plan.workspace)
    tables = _patient_rows(ws, batch.patient_ids)
    index = tables["index_encounters"]
    chosen = index[index["encounter_id"].isin(batch.encounter_ids)]
    policy = None
    if "pmlm" in plan.spec.methods:
        policy = load_policy(policy_dir(ws))
        if policy.version != plan.spec.policy_version:
            raise StaleStateError(
                f"the policy in {policy_dir(ws)} is {policy.version}, not {plan.spec.policy_version} "
                "that this prompt table was planned with: rerun the refine step"
            )
    frame = build_prompt_table(
        {**tables, "index_encounters": chosen},
        plan.spec.methods,
        lambda _ids: signals.signals,
        "all",
        plan.spec.config,
        policy=policy,
    )
    return frame


def _patient_rows(workspace: Workspace, patients: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The rows of ``patients`` in the tables a prompt reads (parquet filters: no full read)."""
    wanted = sorted(patients)
    out = {}
    for name in BATCH_TABLES:
        path = workspace.table_path(name)
        if not path.exists():
            workspace.read_table(name)  # raises the error that says which step writes it
        out[name] = pq.read_table(path, filters=[("patient_id", "in", wanted)]).to_pandas()
    return out


def _check_model(workspace: Workspace, plan: PromptPlan) -> None:
    now = files_fingerprint(models_dir(workspace))
    if now != plan.model_fingerprint:
        raise StaleStateError(
            f"the recommenders in {models_dir(workspace)} changed after the prompt table was "
            "planned (a fit ran meanwhile): run the build again"
        )
