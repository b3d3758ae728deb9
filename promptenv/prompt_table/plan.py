"""Plan a prompt-table build: compare the workspace with the last build, split the work in batches."""

from __future__ import annotations

import pandas as pd

from pipelines.fingerprint import (
    combine_by_key,
    compare_fingerprints,
    files_fingerprint,
    patient_fingerprints,
)
from pipelines.ingest import load_tables
from pipelines.workspace import Workspace, write_frame
from promptenv.prompt_table.build import choose_encounters
from promptenv.prompt_table.changes import (
    affected_patients,
    full_recompute_reason,
    read_previous,
    state_hashes,
)
from promptenv.prompt_table.spec import (
    PLAN_TABLES,
    PromptBatch,
    PromptPlan,
    PromptTableSpec,
    digest,
    refresh_dir,
)
from recsys.interactions import CohortTables, build_states
from recsys.state_store import save_states
from recsys.steps import load_fitted, models_dir, selected_model_name


def plan_prompt_table(
    workspace: Workspace,
    spec: PromptTableSpec | None = None,
    *,
    full: bool = False,
) -> PromptPlan:
    """Compare the workspace with its last prompt-table build and plan the batches to compute.

    ``full=True`` recomputes every patient. Raises FileNotFoundError when no
    recommender was fitted (run `pmlm recsys fit` or the build flow first).
    """
    spec = spec or PromptTableSpec()
    tables = load_tables(workspace, PLAN_TABLES)
    name = selected_model_name(workspace)
    model_fp = files_fingerprint(models_dir(workspace))
    model = load_fitted(workspace, name)
    assert model.vocab is not None
    records = patient_fingerprints(tables)
    states = build_states(CohortTables.from_frames(tables), model.vocab)
    embeddings = model.embed(states)
    state_frame = state_hashes(states, embeddings)
    chosen = choose_encounters(tables["index_encounters"], spec.which)
    chosen = chosen.sort_values(["patient_id", "index_time", "encounter_id"])

    previous = read_previous(workspace)
    full_reason = full_recompute_reason(workspace, previous, spec, model_fp, full)
    patients_now = set(chosen["patient_id"])
    reasons: dict[str, int] = {"all": 0, "records": 0, "states": 0, "peers": 0}
    record_changes: dict[str, int] | None = None
    removed: tuple[str, ...] = ()
    if full_reason is not None or previous is None:
        todo = patients_now
        reasons["all"] = len(todo)
    else:
        changes = compare_fingerprints(previous.patients, records)
        record_changes = changes.as_dict()
        by_record, by_state, by_peers = affected_patients(
            changes, previous, state_frame, embeddings, chosen, spec.settings
        )
        todo = (by_record | by_state | by_peers) & patients_now
        reasons["records"] = len(by_record & patients_now)
        reasons["states"] = len((by_state - by_record) & patients_now)
        reasons["peers"] = len((by_peers - by_record - by_state) & patients_now)
        shown = set(previous.queries["patient_id"])
        removed = tuple(sorted(p for p in shown if p not in patients_now))

    batches = _batches(chosen, todo, records, state_frame, spec, model_fp)
    key = digest(
        {
            "model": model_fp,
            "spec": spec.identity(),
            "batches": [b.key for b in batches],
            "removed": removed,
        }
    )
    run_dir = refresh_dir(workspace) / f"run-{key}"
    if batches:
        save_states(run_dir, states, embeddings)
    write_frame(run_dir / "records.parquet", records)
    write_frame(run_dir / "states.parquet", state_frame)
    return PromptPlan(
        workspace=workspace.root,
        run_dir=run_dir,
        spec=spec,
        model=name,
        model_fingerprint=model_fp,
        batches=tuple(batches),
        patients=len(patients_now),
        reasons=reasons,
        removed=removed,
        full_reason=full_reason,
        record_changes=record_changes,
    )


def _batches(
    chosen: pd.DataFrame,
    todo: set[str],
    records: pd.DataFrame,
    states: pd.DataFrame,
    spec: PromptTableSpec,
    model_fp: str,
) -> list[PromptBatch]:
    work = chosen[chosen["patient_id"].isin(todo)]
    if work.empty:
        return []
    record_of = dict(zip(records["patient_id"], records["fingerprint"], strict=True))
    state_of = combine_by_key(states["patient_id"], states["state_hash"].to_numpy())["hash"]
    pool = states[states["split"] == "train"].sort_values("encounter_id")
    pool_fp = digest(list(zip(pool["encounter_id"], pool["state_hash"].astype(str), strict=True)))
    base = {"model": model_fp, "spec": spec.identity(), "pool": pool_fp}
    patients = sorted(set(work["patient_id"]))
    encounters = work.groupby("patient_id", sort=True)["encounter_id"].apply(list)
    batches = []
    for i, start in enumerate(range(0, len(patients), spec.batch_size)):
        group = patients[start : start + spec.batch_size]
        ids = tuple(e for p in group for e in encounters[p])
        inputs = [(p, record_of[p], str(state_of.get(p, 0)), encounters[p]) for p in group]
        batches.append(PromptBatch(i, digest({**base, "patients": inputs}), ids, tuple(group)))
    return batches
