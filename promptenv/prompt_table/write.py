"""Write a prompt-table build: merge the batches, write the table, then the state the next
refresh compares with; and the whole build in one process (`refresh_prompt_table`)."""

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
    """Merge the batches' rows into the prompt table, write it, then the refresh state.

    The table is written before the state, so a crash in between makes the next
    build recompute everyone (its table no longer matches the recorded one).
    """
    if len(prompts) != len(plan.batches) or len(signals) != len(plan.batches):
        raise ValueError(
            f"the plan has {len(plan.batches)} batches but {len(prompts)} prompt frames and "
            f"{len(signals)} signal results were given"
        )
    ws = Workspace.at(plan.workspace)
    recomputed = {p for b in plan.batches for p in b.patient_ids}
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
    unchanged = plan.full_reason is None and not plan.batches and not plan.removed
    if not unchanged:  # an unchanged table keeps its file (and its sha256)
        write_prompt_table(ws, table)
    new_queries = [s.queries for s in signals if len(s.queries)]
    queries = pd.concat([queries, *new_queries], ignore_index=True)

    state = refresh_dir(ws)
    write_frame(state / "patients.parquet", pd.read_parquet(plan.run_dir / "records.parquet"))
    write_frame(state / "states.parquet", pd.read_parquet(plan.run_dir / "states.parquet"))
    write_frame(state / "queries.parquet", queries.sort_values("encounter_id"))
    path = ws.table_path(PROMPT_TABLE)
    build = {
        "spec": plan.spec.identity(),
        "model": plan.model,
        "model_fingerprint": plan.model_fingerprint,
        "table_sha256": file_sha256(path),
        "rows": len(table),
        "patients": plan.patients,
        "recomputed_patients": len(recomputed),
        "reasons": dict(plan.reasons),
        "removed": len(plan.removed),
        "full_reason": plan.full_reason,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_bytes(state / "build.json", json.dumps(build, indent=2).encode())
    # this run's states, and those a crashed run left (one build at a time per workspace)
    for run_dir in state.glob("run-*"):
        shutil.rmtree(run_dir)
    ws.record_step(
        "prompts",
        {k: build[k] for k in ("model", "rows", "patients", "recomputed_patients", "full_reason")}
        | {"methods": list(plan.spec.methods), "which": plan.spec.which, "output": str(path)},
    )
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
