"""Prefect tasks: each a thin wrapper over one plain step of `pipelines`, `recsys` or `promptenv`.

Tasks take the workspace as a path string and return small values (summaries,
ids, the rows of one batch); the tables, models and reports stay in the
workspace's files. They log; they hold no logic of their own (the steps are
`pipelines.steps`, `recsys.steps`, `promptenv.steps` and `promptenv.prompt_table`).

Caching. The expensive tasks (recommender fit, each batch's signals and
prompts) are cached by their inputs and their source code
(``cache_policy=INPUTS + TASK_SOURCE + CODE``), where an input carries a data
fingerprint: the fit's ``data_fingerprint`` hashes every patient's records, a
batch's ``key`` hashes its patients' records and states, the recommender and the
peer pool. The workspace path is not part of a key: the cache records and
results live in the workspace itself (``WORKSPACE/cache/prefect/``, see
`in_workspace`), so a new workspace never sees another's, and a copied one
keeps its own. LLM clients are made inside the task and never enter a key. The
records are cloudpickle, so they are signed with the workspace's secret and a
doctored one is refused before Prefect reads it (`flows.result_storage`).

Retries. The task that calls an LLM is retried (``retries=2``) when its failure
may pass by itself (the LLM's transient failures outlasting the client's own
retries, a lost connection, a timeout), not for bad data or configuration;
answers already received are in the LLM client's cache, so a retry or a rerun
after a crash asks only for the missing ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.tasks import Task

from flows.publish import publish_manifest, publish_report_link
from flows.result_storage import SignedLocalFileSystem, saved
from pipelines.workspace import Workspace
from promptenv.policy import PolicySettings, TrainingSummary
from promptenv.prompt_table import (
    BatchSignals,
    PromptBatch,
    PromptPlan,
    PromptTableSpec,
    RefreshResult,
)

#: Folder of the cached tasks' results and cache records, under ``WORKSPACE/cache``.
PREFECT_CACHE = "prefect"
#: Seconds between the attempts of a task that calls an LLM.
LLM_RETRY_DELAYS = [10.0, 30.0]

T = TypeVar("T", bound=Task[Any, Any])


@dataclass
class PackageCode(CachePolicy):
    """Part of a cache key: the pmlm version and a hash of the packages' source
    (`pipelines.fingerprint.code_fingerprint`), so an upgrade or an edit of `recsys` or
    `promptenv` never reuses a result the old code computed."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any] | None,
        flow_parameters: dict[str, Any] | None,
        **kwargs: Any,
    ) -> str | None:
        from pipelines.fingerprint import code_fingerprint

        return code_fingerprint()


CODE = PackageCode()


def cache_storage(workspace: str | Path) -> SignedLocalFileSystem:
    """Where the cached tasks of ``workspace`` keep their results and cache records: signed
    files (`flows.result_storage`), so a doctored record is refused, never unpickled."""
    ws = Workspace.at(workspace)
    folder = (ws.cache_dir / PREFECT_CACHE).resolve()
    return SignedLocalFileSystem(basepath=str(folder), workspace_root=str(ws.root.resolve()))


def in_workspace(cached_task: T, workspace: str | Path, *, refresh: bool = False) -> T:
    """``cached_task`` with its results and cache records in ``workspace``.

    ``refresh=True`` runs it even on a cache hit and stores the new result.
    """
    configured = cached_task.with_options(
        result_storage=saved(cache_storage(workspace)), refresh_cache=refresh
    )
    return cast(T, configured)


def _say(message: str) -> None:
    get_run_logger().info(message)


def _progress() -> Callable[[str], None]:
    """A progress callback bound to this task run's logger: also usable from the worker
    threads a step starts (the LLM client's), where Prefect has no run context."""
    logger = get_run_logger()
    return logger.info


def _worth_retrying(_task: Task[Any, Any], _run: object, state: State[Any]) -> bool:
    """Retry what may pass by itself: the LLM's transient failures outlasting the client's own
    retries, lost connections, timeouts, a busy cache file; not bad data or configuration."""
    import sqlite3

    from promptenv.llm.errors import RetriesExhausted, TransientBackendError

    passing = (
        RetriesExhausted,
        TransientBackendError,
        OSError,
        TimeoutError,
        sqlite3.OperationalError,
    )
    return isinstance(state.data, passing)


# --------------------------------------------------------------------------- data


@task(name="prepare-cohort", cache_policy=NO_CACHE)
def prepare_cohort(
    workspace: str,
    source: str = "default",
    split_seed: int = 0,
    ingest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Canonical tables, reference plans, index encounters and the split
    (`pipelines.steps.prepare_source`; ``ingest``: its keyword options, e.g. ``plans``)."""
    from pipelines.steps import prepare_source

    return prepare_source(Workspace.at(workspace), source, split_seed, **(ingest or {}))


@task(name="fingerprint-records", cache_policy=NO_CACHE)
def fingerprint_records(workspace: str) -> str:
    """A hash of every patient's records (`pipelines.steps.records_fingerprint`)."""
    from pipelines.steps import records_fingerprint

    return records_fingerprint(Workspace.at(workspace))


# --------------------------------------------------------------------------- recommender


@dataclass(frozen=True)
class FitOutcome:
    """The fitted recommenders: the selected one and each model's validation score."""

    best: str
    validation: list[dict[str, Any]]


@task(name="fit-recommenders", cache_policy=(INPUTS - "workspace") + TASK_SOURCE + CODE)
def fit_recommenders(
    workspace: str,
    data_fingerprint: str,
    grids: dict[str, dict[str, list[Any]]] | None = None,
    k: int = 10,
    select_on: str = "all",
) -> FitOutcome:
    """Fit and select the recommenders (`recsys.steps.fit_models`); cached per data fingerprint.

    ``data_fingerprint`` is not read here: it is the cache key's hold on the data.
    """
    from recsys.steps import fit_models

    fit = fit_models(workspace, grids=grids, k=k, select_on=select_on, progress=_progress())
    return FitOutcome(fit.best, fit.validation.to_dict(orient="records"))


@task(name="selected-recommender", cache_policy=NO_CACHE)
def selected_recommender(workspace: str) -> str | None:
    """The recommender that the last fit selected, or None before any fit."""
    from recsys.steps import read_selection

    best = read_selection(workspace).get("best")
    return None if best is None else str(best)


# --------------------------------------------------------------------------- prompts


@task(name="plan-prompts", cache_policy=NO_CACHE)
def plan_prompts(workspace: str, spec: PromptTableSpec, full: bool = False) -> PromptPlan:
    """Which patients' signals and prompts to (re)compute, in batches (`promptenv.prompt_table`)."""
    from promptenv.prompt_table import plan_prompt_table

    plan = plan_prompt_table(Workspace.at(workspace), spec, full=full)
    _say(plan.describe())
    return plan


@task(
    name="signals",
    cache_policy=(INPUTS - "plan") + TASK_SOURCE + CODE,
    task_run_name="signals-{batch.index}",
)
def compute_signals(plan: PromptPlan, batch: PromptBatch) -> BatchSignals:
    """Self and peer signals of one batch; cached by the batch's content key."""
    from promptenv.prompt_table import batch_signals

    return batch_signals(plan, batch)


@task(
    name="prompts",
    cache_policy=(INPUTS - "plan" - "signals") + TASK_SOURCE + CODE,
    task_run_name="prompts-{batch.index}",
)
def batch_prompt_rows(plan: PromptPlan, batch: PromptBatch, signals: BatchSignals) -> pd.DataFrame:
    """The prompt rows of one batch; cached by the batch's content key (which fixes its signals)."""
    from promptenv.prompt_table import batch_prompts

    return batch_prompts(plan, batch, signals)


@task(name="write-prompt-table", cache_policy=NO_CACHE)
def write_prompts(
    plan: PromptPlan, prompts: Sequence[pd.DataFrame], signals: Sequence[BatchSignals]
) -> RefreshResult:
    """Merge the batches into ``tables/prompts.parquet`` and record what it was built from."""
    from promptenv.prompt_table import write_refreshed_table

    result = write_refreshed_table(plan, prompts, signals)
    _say(result.describe())
    return result


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class PolicyOutcome:
    """The trained policy's version and what training cost."""

    version: str
    path: Path
    training: TrainingSummary
    #: the fixed prompt training started from, and a fall-back keeps (`StartConfig.method`)
    start: str = "pmlm_initial"
    #: "" when trained by this run; else the command that trained the shipped policy
    shipped_by: str = ""

    def describe(self) -> str:
        """One line for the main job's output and its flow artifact."""
        training = self.training
        origin = (
            f" (shipped with the default cohort, trained by `{self.shipped_by}`)"
            if self.shipped_by
            else ""
        )
        kept = (
            f"it did not beat the {self.start} prompt (the best fixed one on validation) "
            "beyond noise, so `pmlm` is that prompt, unedited"
            if training.falls_back_to_start
            else f"its edits start from the {self.start} prompt"
        )
        return (
            f"Policy {self.version}{origin}: {training.episodes} training episodes, "
            f"{training.llm_calls} LLM calls; {kept}."
        )


@task(
    name="train-policy",
    cache_policy=INPUTS + TASK_SOURCE + CODE,
    retries=2,
    retry_delay_seconds=LLM_RETRY_DELAYS,
    retry_condition_fn=_worth_retrying,
)
def train_policy_task(
    workspace: str,
    backend: str,
    data_fingerprint: str,
    recommender: str,
    settings: PolicySettings,
    source: str = "auto",
) -> PolicyOutcome:
    """The prompt-editing policy (`promptenv.steps.workspace_policy`: the shipped one where
    it fits and ``source`` allows, else trained now); cached by data, recommender, LLM,
    settings and source. A rerun after a crash asks the LLM only for answers that are not
    in its cache."""
    from promptenv.policy import training_summary
    from promptenv.steps import workspace_policy

    result = workspace_policy(
        Workspace.at(workspace),
        backend,
        settings,
        {"data_fingerprint": data_fingerprint},
        progress=_progress(),
        source=source,
    )
    _say(training_summary(result.policy))
    info = result.policy.info
    return PolicyOutcome(
        result.policy.version, result.path, info.training, info.start.method, result.shipped_by
    )


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvaluationOutcome:
    """Where the evaluation report is, and its table (one row per subset and method)."""

    report: Path
    table: list[dict[str, Any]]
    markdown: str
    llm: str
    cache_hits: int
    cache_misses: int
    #: did the policy beat the best fixed prompt and the bare question (`promptenv.verdict`)
    verdict: str = ""


@task(
    name="evaluate-methods",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=LLM_RETRY_DELAYS,
    retry_condition_fn=_worth_retrying,
)
def evaluate_with_llm(
    workspace: str,
    backend: str,
    methods: Sequence[str],
    n_obstetric: int,
    n_adult: int,
    n_calibration: int,
    seed: int = 0,
    max_calls: int | None = None,
    make_up: bool = False,
) -> EvaluationOutcome:
    """Every method on the same test encounters with one LLM (`promptenv.steps.evaluate_workspace`);
    ``make_up``: one subset's shortfall of encounters is taken from the other."""
    from promptenv.evaluate import EvalSettings, markdown_table
    from promptenv.steps import budgeted_client, evaluate_workspace, policy_if_needed

    ws = Workspace.at(workspace)
    policy = policy_if_needed(ws, list(methods))
    client = budgeted_client(backend, ws, max_calls)
    settings = EvalSettings(
        n_obstetric=n_obstetric,
        n_adult=n_adult,
        n_calibration=n_calibration,
        seed=seed,
        make_up=make_up,
    )
    result, files = evaluate_workspace(
        ws, client, methods, settings, progress=_progress(), policy=policy
    )
    stats = client.cache_stats
    _say(
        f"{client.label}: {stats.hits} answers from the cache, {stats.misses} asked → {files.table}"
    )
    _say(f"Report with plots: {files.report}; to open in a browser: {files.html}")
    publish_report_link(files.html)
    return EvaluationOutcome(
        report=files.table,
        table=result.table.to_dict(orient="records"),
        markdown=markdown_table(result.table),
        llm=result.llm,
        cache_hits=stats.hits,
        cache_misses=stats.misses,
        verdict=files.verdict,
    )


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportOutcome:
    """The exported files (format → path or SQL target) and the manifest."""

    files: dict[str, str]
    manifest: Path
    rows: int


@task(name="export-prompts", cache_policy=NO_CACHE)
def export_prompts(
    workspace: str,
    methods: Sequence[str],
    formats: Sequence[str] = ("parquet", "jsonl", "sql"),
    sql_url: str | None = None,
    out: str | None = None,
) -> ExportOutcome:
    """The prompt table's rows of ``methods`` → parquet, JSONL, SQL and a manifest
    (`promptenv.steps.export_workspace`)."""
    from promptenv.steps import export_workspace

    written = export_workspace(
        Workspace.at(workspace),
        list(methods),
        list(formats),
        sql_url,
        Path(out) if out is not None else None,
    )
    result = written.result
    _say(
        f"{result.rows} prompts exported → {written.target} (manifest {result.manifest_path.name})"
    )
    publish_manifest(result.manifest_path)
    return ExportOutcome(dict(result.files), result.manifest_path, result.rows)
