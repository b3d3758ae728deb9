"""The prompt table: build it, and keep it up to date incrementally.

`build_prompt_table` (`build`) makes the rows of some encounters and methods in
one call. A workspace's table is built in three steps instead, recomputing only
the patients whose inputs changed, so that a scheduler can fan the middle one out
(modules by job: `spec` the values passed around, `changes` what changed since
the last build, `plan`, `batches`, `write`; the recommender states a build shares
between batches are saved by `recsys.state_store`).

1. `plan_prompt_table` reads the canonical tables, computes every patient's
   record fingerprint (`pipelines.fingerprint`) and the selected recommender's
   state and embedding of every index encounter (one vectorized pass), compares
   them with what the current prompt table was built from, and splits the
   patients to recompute into batches;
2. per batch, `batch_signals` (self and peer signals) and `batch_prompts` (the
   prompt rows); a batch reads the plan's files, never another batch's;
3. `write_refreshed_table` keeps the rows of the other patients, adds the new
   ones, writes ``tables/prompts.parquet`` and then the state that the next
   refresh compares with.

A patient is recomputed when her records changed (added, edited or removed
rows), when her recommender state changed (a state also depends on the plan
items of the whole cohort, through the codes that count as plan items), or when
her peers may have changed: the state through which one of her peers was found
changed, or a changed training state eligible as her peer is at least as similar
as her k-th peer (any other change leaves her k most similar patients, their
states and what they received next as they were). Everyone is recomputed when
there is no previous build, when the recommender or the prompt settings
changed, or when the prompt table was replaced since (e.g. by ``pmlm prompts
build``). The result equals a full recompute: self signals are scored one
state at a time and peers searched one query at a time, so a row never depends
on which other rows share its batch.

The recommender is never refit here: a refresh uses the workspace's selected
model (`pmlm recsys fit` or the build flow fits it).

Files under ``WORKSPACE/cache/refresh/`` (deleting them forces a full recompute)::

    build.json         spec, recommender fingerprint and prompt-file sha256 of the current table
    patients.parquet   patient_id, fingerprint: the records the table was built from
    states.parquet     every index encounter's state hash (encounter_id, patient_id, split,
                       index_us, next_us, state_hash)
    queries.parquet    per prompt-table encounter: its peers' states (encounter ids), the
                       k-th peer's similarity and the number of peers found
    run-KEY/           one build's recommender states and embeddings, read by the batches
                       and deleted once the table is written (one build at a time per
                       workspace)

Usage::

    result = refresh_prompt_table(Workspace.at("pmlm-workspace"))
    result.recomputed_patients, result.patients, result.full_reason
"""

from promptenv.prompt_table.batches import batch_prompts, batch_signals
from promptenv.prompt_table.build import (
    PROMPT_TABLE,
    PROMPTS_SCHEMA,
    Which,
    build_prompt_table,
    choose_encounters,
    write_prompt_table,
)
from promptenv.prompt_table.plan import plan_prompt_table
from promptenv.prompt_table.spec import (
    BatchSignals,
    PromptBatch,
    PromptPlan,
    PromptTableSpec,
    RefreshResult,
    refresh_dir,
)
from promptenv.prompt_table.write import refresh_prompt_table, write_refreshed_table

__all__ = [
    "PROMPTS_SCHEMA",
    "PROMPT_TABLE",
    "BatchSignals",
    "PromptBatch",
    "PromptPlan",
    "PromptTableSpec",
    "RefreshResult",
    "Which",
    "batch_prompts",
    "batch_signals",
    "build_prompt_table",
    "choose_encounters",
    "plan_prompt_table",
    "refresh_dir",
    "refresh_prompt_table",
    "write_prompt_table",
    "write_refreshed_table",
]
