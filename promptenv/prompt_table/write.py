"""Write a prompt-table build: merge the batches, then publish the table, the state the next
refresh compares with and the manifest entry in one workspace transaction; and the whole
build in one process (`refresh_prompt_table`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime

import pandas as pd

from pipelines.export import file_sha256
from pipelines.workspace import Workspace, atomic_write_bytes, write_frame
from promptenv.prompt_table.batches import batch_prompts, batch_signals
from promptenv.prompt_table.build import PROMPT_TABLE, PROMPTS_SCHEMA, write_prompt_table
from promptenv.prompt_table.plan import plan_prompt_table
from promptenv.prompt_table.spec import (
    QUERY_COLUMNS,
    BatchSignals,
    PromptPlan,
    PromptTableSpec,
    RefreshResult,
    refresh_dir,
)
from recsys.type_aliases import Progress, Tick


def write_refreshed_table(
    plan: PromptPlan,
    prompts: Sequence[pd.DataFrame],
    signals: Sequence[BatchSignals],
) -> RefreshResult:
    """Merge the batches' rows into the prompt table and publish it with the refresh state.

    The table, the refresh state and the manifest entry are one workspace transaction
    (`pipelines.workspace`): a kill leaves the previous build or this one, never a table
    beside another build's state.
    """
    if len(prompts) != len(plan.batches) or len(signals) != len(plan.batches):
        raise ValueError(
            f"the plan has {len(plan.batches)} batches but {len(prompts)} prompt frames and "
            f"{len(signals)} signal results were given"
        )
    ws = Workspace.at(plan.workspace)
    recomputed = {p for b in plan.batches for p in b.patient_ids}
    state = refresh_dir(ws)
    path = ws.table_path(PROMPT_TABLE)
    # read, merge and publish under the workspace lock: the table, the state the next
    # refresh compares with and the manifest entry publish together, so a kill leaves the
    # previous build whole or this one, and no other build publishes in between
    with ws.transaction("prompts") as txn:
        table, queries = _merge(ws, plan, recomputed, prompts, signals)
        if plan.full_reason is not None or plan.batches or plan.removed:
            write_prompt_table(ws, table)  # an unchanged table keeps its file (and its sha256)
        write_frame(state / "patients.parquet", pd.read_parquet(plan.run_dir / "records.parquet"))
        write_frame(state / "states.parquet", pd.read_parquet(plan.run_dir / "states.parquet"))
        write_frame(state / "queries.parquet", queries)
        build = {
            "spec": plan.spec.identity(),
            "model": plan.model,
            "model_fingerprint": plan.model_fingerprint,
            "table_sha256": file_sha256(txn.staged_version(path) or path),
            "rows": len(table),
            "patients": plan.patients,
            "recomputed_patients": len(recomputed),
            "reasons": dict(plan.reasons),
            "removed": len(plan.removed),
            "full_reason": plan.full_reason,
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        atomic_write_bytes(state / "build.json", json.dumps(build, indent=2).encode())
        txn.record_step(
            "prompts",
            {
                k: build[k]
                for k in ("model", "rows", "patients", "recomputed_patients", "full_reason")
            }
            | {"methods": list(plan.spec.methods), "which": plan.spec.which, "output": str(path)},
        )
    # this run's scratch states, and those a crashed run left (one build at a time per
    # workspace), once the build is published
    for run_dir in state.glob("run-*"):
        shutil.rmtree(run_dir)
    return RefreshResult(
        path=path,
        recommender=plan.model,
        rows=len(table),
        patients=plan.patients,
        recomputed_patients=len(recomputed),
        reasons=dict(plan.reasons),
        removed=len(plan.removed),
        full_reason=plan.full_reason,
        batches=len(plan.batches),
    )


def _merge(
    ws: Workspace,
    plan: PromptPlan,
    recomputed: set[str],
    prompts: Sequence[pd.DataFrame],
    signals: Sequence[BatchSignals],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The new prompt table (the kept rows of the others, the batches' new rows, in a stable
    order) and the new queries of the refresh state."""
    drop = recomputed | set(plan.removed)
    new_rows = [frame for frame in prompts if len(frame)]
    columns = list(PROMPTS_SCHEMA.names)
    if plan.full_reason is None:
        kept = ws.read_table(PROMPT_TABLE)
        kept = kept[~kept["patient_id"].isin(drop)]
        queries = pd.read_parquet(refresh_dir(ws) / "queries.parquet")
        queries = queries[~queries["patient_id"].isin(drop)]
        parts = [kept, *new_rows]
    else:
        parts = list(new_rows)
        queries = pd.DataFrame({c: [] for c in QUERY_COLUMNS})
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    order = {m: i for i, m in enumerate(plan.spec.methods)}
    table = (
        table.assign(_method=table["method"].map(order))
        .sort_values(["patient_id", "index_time", "encounter_id", "_method"], kind="stable")
        .drop(columns="_method")
        .reset_index(drop=True)[columns]
    )
    new_queries = [s.queries for s in signals if len(s.queries)]
    queries = pd.concat([queries, *new_queries], ignore_index=True)
    return table, queries.sort_values("encounter_id")


def refresh_prompt_table(
    workspace: Workspace,
    spec: PromptTableSpec | None = None,
    *,
    full: bool = False,
    progress: Progress | None = None,
    tick: Tick | None = None,
) -> RefreshResult:
    """Plan, compute every batch in turn, and write: the whole build in this process.

    The recommender is not refit (see the module docstring). ``tick(batches_done, batches)``
    follows the batches (a progress bar).
    """
    say = progress or (lambda _m: None)
    plan = plan_prompt_table(workspace, spec, full=full)
    say(plan.describe())
    signals, prompts = [], []
    for batch in plan.batches:
        signals.append(batch_signals(plan, batch))
        prompts.append(batch_prompts(plan, batch, signals[-1]))
        if tick is not None:
            tick(len(prompts), len(plan.batches))
    return write_refreshed_table(plan, prompts, signals)
