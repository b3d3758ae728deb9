"""Prefect flows: the main job and its parts, built from the tasks of `flows.tasks`.

- `build`: canonical tables (ingest or the built-in cohort; reference plans,
  index encounters, split) → recommender (fit, cached per data fingerprint) →
  signals → initial prompts, the last two in batches that a task runner fans out;
- `refresh`: the nightly job: re-ingest, then signals and prompts of the patients
  whose records changed (`promptenv.prompt_table`); the recommender is NOT refit
  unless ``refit=True`` (or no recommender was fitted yet);
- `evaluate`: the methods compared with one LLM on the same test encounters;
- `export`: the prompt table's rows of the chosen methods → parquet, JSONL, SQL;
- `train_policy`: the prompt-editing policy (MaskablePPO; cached by its inputs);
- `refine`: the policy's prompts (method ``pmlm``) added to the prompt table;
- `pmlm_pipeline`: build (no prompts) → train_policy → refine (the prompt table,
  initial and refined) → evaluate → export.

Every flow takes the workspace folder as a path; the task runner is chosen with
`make_task_runner` (threads, or Dask: a local cluster or a scheduler's address).
Usage::

    from flows.pipeline import pmlm_pipeline
    result = pmlm_pipeline(workspace="pmlm-workspace", backend="local", n_obstetric=12)
    result.build.prompts.path, result.evaluation.report
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.publish import publish_flow_summary
from flows.tasks import (
    EvaluationOutcome,
    ExportOutcome,
    FitOutcome,
    PolicyOutcome,
    batch_prompt_rows,
    compute_signals,
    evaluate_with_llm,
    export_prompts,
    fingerprint_records,
    fit_recommenders,
    in_workspace,
    plan_prompts,
    prepare_cohort,
    selected_recommender,
    train_policy_task,
    write_prompts,
)
from pipelines.workspace import Workspace
from promptenv.encounters import CALIBRATION_ENCOUNTERS
from promptenv.policy import PolicySettings
from promptenv.policy_info import saved_policy_version
from promptenv.prompt_table import PromptTableSpec, RefreshResult
from promptenv.prompts import METHODS
from promptenv.report_html import HTML_FILE
from promptenv.steps import EXPORT_FORMATS, POLICY_SOURCES, quick_policy_settings
from recsys.steps import QUICK_GRIDS

TASK_RUNNERS = ("threads", "dask")
#: What the main job compares: the bare question, the fixed prompts one would otherwise
#: deploy, the oracle (told the plan: the ceiling) and the policy's prompts. `pmlm evaluate`
#: compares every method, random edits and per-patient search included.
MAIN_JOB_METHODS = ("general", "self", "peer", "pmlm_initial", "oracle", "pmlm")


def make_task_runner(
    kind: str = "threads", dask_address: str | None = None, n_workers: int = 2
) -> TaskRunner[Any]:
    """Where tasks run: ``threads`` (this process, ``n_workers`` threads) or ``dask``.

    Dask runs on the scheduler at ``dask_address`` (``tcp://host:8786``; its workers
    must see the workspace folder at the same path), else on a local cluster of
    ``n_workers`` single-threaded worker processes started for the flow run.

    Threads are bounded: Prefect's default pool is unbounded, so every batch of the prompt
    table ran at once, each with its own copy of the recommender's training states (the
    2,694 patients of Eunomia: 85 batches, 13.1 GB peak RSS).
    """
    if kind == "threads":
        if dask_address:
            raise ValueError("--dask-address needs --task-runner dask")
        return ThreadPoolTaskRunner(max_workers=n_workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": n_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
                "silence_logs": logging.WARNING,
            }
        )
    raise ValueError(f"unknown task runner {kind!r}: choose {' or '.join(TASK_RUNNERS)}")


def prefect_destination() -> str:
    """Where flow runs are recorded: the configured Prefect API, else a temporary local server."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return f"flow runs recorded at {settings.api.url}"
    return (
        "no PREFECT_API_URL: a temporary local server records the runs in "
        f"{Path(settings.home) / 'prefect.db'} (PREFECT_HOME)"
    )


def _workspace(workspace: str | None) -> str:
    return str(Workspace.at(workspace).root.resolve())


def _prompts_note(result: RefreshResult) -> str:
    return (
        f"{result.rows} prompts in `{result.path}`; signals and prompts computed for "
        f"{result.recomputed_patients} of {result.patients} patients in this run."
    )


def _export_note(result: ExportOutcome) -> str:
    return f"{result.rows} prompts exported; manifest `{result.manifest}`."


@dataclass(frozen=True)
class BuildOutcome:
    """What a build or refresh did: the data summary, the fit (None when not refit), the prompts."""

    workspace: Path
    summary: dict[str, Any]
    fit: FitOutcome | None
    recommender: str
    prompts: RefreshResult | None  # None when the build was asked for no prompts


def _prompt_table(workspace: str, spec: PromptTableSpec, full: bool) -> RefreshResult:
    """Plan, then signals and prompts per batch (fanned out by the task runner), then write."""
    plan = plan_prompts(workspace, spec, full)
    signals = in_workspace(compute_signals, workspace).map(unmapped(plan), plan.batches)
    prompts = in_workspace(batch_prompt_rows, workspace).map(unmapped(plan), plan.batches, signals)
    # the results, not the futures, signals first: a failed batch raises its own error here,
    # where a task handed a failed future would not run and return None (Prefect's NotReady)
    batch_signals = signals.result()
    written: RefreshResult = write_prompts(plan, prompts.result(), batch_signals)
    return written


@flow(name="pmlm-build", task_runner=make_task_runner())
def build(
    workspace: str | None = None,
    source: str = "default",
    split_seed: int = 0,
    methods: list[str] | None = None,
    which: str = "latest",
    batch_size: int = 32,
    grids: dict[str, dict[str, list[Any]]] | None = None,
    refit: bool = False,
    full: bool = False,
    with_prompts: bool = True,
    ingest: dict[str, Any] | None = None,
) -> BuildOutcome:
    """Canonical tables → recommender → signals → initial prompts (``tables/prompts.parquet``).

    The fit is cached per data fingerprint and grid (``refit=True`` fits anyway);
    signals and prompts are recomputed only for the patients whose inputs changed
    since the last build (``full=True`` recomputes all). ``grids`` defaults to
    `QUICK_GRIDS`; ``methods`` to ``["pmlm_initial"]``. ``with_prompts=False`` stops
    after the fit (the main job writes the table once, with the policy's prompts).
    ``ingest``: the ingest options of ``source`` (`pipelines.steps.prepare_source`'s
    ``fmt``, ``plans``, ``plan_headers``, ``cdm_schema``).
    """
    log = get_run_logger()
    ws = _workspace(workspace)
    spec = PromptTableSpec(tuple(methods or ["pmlm_initial"]), which, batch_size=batch_size)  # type: ignore[arg-type]
    log.info(f"Step 1/3: canonical tables, reference plans, index encounters and split ({source})")
    summary = prepare_cohort(ws, source, split_seed, ingest)
    fingerprint = fingerprint_records(ws)
    log.info(
        "Step 2/3: recommenders (baselines, LightFM, ALS, BPR, item-kNN, blend), "
        "chosen on validation patients"
    )
    fit = in_workspace(fit_recommenders, ws, refresh=refit)(
        ws, fingerprint, grids if grids is not None else QUICK_GRIDS
    )
    log.info(f"  selected: {fit.best}")
    if not with_prompts:
        publish_flow_summary(
            "pmlm-build", cohort=summary, recommender=fit.best, recommender_rows=fit.validation
        )
        return BuildOutcome(Path(ws), summary, fit, fit.best, None)
    log.info("Step 3/3: signals and personalized prompts, per batch of patients")
    prompts = _prompt_table(ws, spec, full)
    publish_flow_summary(
        "pmlm-build",
        cohort=summary,
        recommender=prompts.recommender,
        recommender_rows=fit.validation,
        notes=[_prompts_note(prompts)],
    )
    return BuildOutcome(Path(ws), summary, fit, prompts.recommender, prompts)


@dataclass(frozen=True)
class RefreshOutcome:
    """The refreshed prompt table and its export."""

    build: BuildOutcome
    export: ExportOutcome


# The parameters refresh shares with `build` are spelt out again on purpose: Prefect builds each
# flow's parameter schema (UI, deployments' ``parameters`` by name: `flows.cli_serve`) from its own
# signature, so one options object would rename them; and refresh cannot call build, which fits
# on every data change (refresh fits only when asked or when nothing is fitted) and writes no export.
@flow(name="pmlm-refresh", task_runner=make_task_runner())
def refresh(
    workspace: str | None = None,
    source: str = "default",
    split_seed: int = 0,
    methods: list[str] | None = None,
    which: str = "latest",
    batch_size: int = 32,
    refit: bool = False,
    grids: dict[str, dict[str, list[Any]]] | None = None,
    export_formats: list[str] | None = None,
    sql_url: str | None = None,
) -> RefreshOutcome:
    """The nightly refresh: re-ingest ``source``, recompute signals and prompts only for the
    patients whose records (or recommender state, or peers) changed, export the prompt table.

    The recommender is NOT refit unless ``refit=True``, or when the workspace has no
    fitted recommender yet; a refit changes every signal, so every prompt is then
    recomputed. Use the same ``methods`` and ``which`` as the build, or every
    prompt is recomputed.
    """
    log = get_run_logger()
    ws = _workspace(workspace)
    chosen = list(methods or ["pmlm_initial"])
    summary = prepare_cohort(ws, source, split_seed)
    fit: FitOutcome | None = None
    if refit or selected_recommender(ws) is None:
        log.info("fitting the recommenders" + (" (asked)" if refit else " (none fitted yet)"))
        fingerprint = fingerprint_records(ws)
        fit = in_workspace(fit_recommenders, ws, refresh=refit)(
            ws, fingerprint, grids if grids is not None else QUICK_GRIDS
        )
    version = saved_policy_version(Workspace.at(ws))
    if version is not None and "pmlm" not in chosen:
        chosen.append("pmlm")  # the policy's prompts are refreshed with the others
    spec = PromptTableSpec(
        tuple(chosen),
        which,  # type: ignore[arg-type]
        batch_size=batch_size,
        policy_version=version or "",
    )
    prompts = _prompt_table(ws, spec, False)
    exported = export_prompts(ws, chosen, list(export_formats or EXPORT_FORMATS), sql_url)
    publish_flow_summary(
        "pmlm-refresh",
        cohort=summary,
        recommender=prompts.recommender,
        recommender_rows=fit.validation if fit is not None else None,
        notes=[_prompts_note(prompts), _export_note(exported)],
    )
    return RefreshOutcome(
        BuildOutcome(Path(ws), summary, fit, prompts.recommender, prompts), exported
    )


@flow(name="pmlm-evaluate")
def evaluate(
    workspace: str | None = None,
    backend: str = "local",
    methods: list[str] | None = None,
    n_obstetric: int = 4,
    n_adult: int = 4,
    n_calibration: int = CALIBRATION_ENCOUNTERS,
    seed: int = 0,
    max_calls: int | None = None,
    make_up: bool = False,
) -> EvaluationOutcome:
    """Compare ``methods`` (default: every method of `promptenv.prompts.METHODS`) on the same
    test encounters with the LLM named by ``backend``; writes ``reports/evaluation.md``.
    ``make_up``: where one subset has fewer test encounters than asked, the other makes up
    the difference."""
    outcome: EvaluationOutcome = evaluate_with_llm(
        _workspace(workspace),
        backend,
        list(methods or METHODS),
        n_obstetric,
        n_adult,
        n_calibration,
        seed,
        max_calls,
        make_up,
    )
    publish_flow_summary(
        "pmlm-evaluate",
        methods=pd.DataFrame(outcome.table),
        llm=outcome.llm,
        report=outcome.report.parent / HTML_FILE,
        notes=[f"LLM cache: {outcome.cache_hits} hits, {outcome.cache_misses} misses."],
    )
    return outcome


@flow(name="pmlm-export")
def export(
    workspace: str | None = None,
    methods: list[str] | None = None,
    formats: list[str] | None = None,
    sql_url: str | None = None,
    out: str | None = None,
) -> ExportOutcome:
    """The prompt table's rows of ``methods`` (default ``["pmlm_initial"]``) → ``WORKSPACE/export``."""
    outcome: ExportOutcome = export_prompts(
        _workspace(workspace),
        list(methods or ["pmlm_initial"]),
        list(formats or EXPORT_FORMATS),
        sql_url,
        out,
    )
    publish_flow_summary("pmlm-export", notes=[_export_note(outcome)])
    return outcome


@dataclass(frozen=True)
class PipelineOutcome:
    build: BuildOutcome
    policy: PolicyOutcome
    refined: RefreshResult
    evaluation: EvaluationOutcome
    export: ExportOutcome


@flow(name="pmlm-pipeline")
def pmlm_pipeline(
    workspace: str | None = None,
    backend: str = "local",
    n_obstetric: int = 12,
    n_adult: int = 4,
    source: str = "default",
    prompt_methods: list[str] | None = None,
    eval_methods: list[str] | None = None,
    task_runner: str = "threads",
    dask_address: str | None = None,
    batch_size: int = 32,
    policy_timesteps: int = 256,
    policy_encounters: int = 8,
    ingest: dict[str, Any] | None = None,
    n_calibration: int = CALIBRATION_ENCOUNTERS,
    policy_source: str = "auto",
) -> PipelineOutcome:
    """The main job: build (data, recommender) → train_policy → refine (signals, then the
    initial and the policy's prompts, one table) → evaluate → export.

    ``n_obstetric`` and ``n_adult`` test encounters (one subset's shortfall made up by the
    other: a cohort of men gets ``n_obstetric + n_adult`` adult ones) are evaluated with the LLM
    ``backend`` (``eval_methods``, default `MAIN_JOB_METHODS`); ``task_runner`` (threads or dask, with ``dask_address``) runs
    the batches of signals and prompts (refine's); ``policy_timesteps`` PPO steps on ``policy_encounters``
    training encounters train the policy (see `quick_policy_settings`). ``ingest``: the
    ingest options of ``source`` (`build`). ``n_calibration`` validation encounters
    calibrate the matching threshold that training and evaluation share.
    ``policy_source``: ``auto`` uses the workspace's own policy where it fits its data,
    recommender and LLM, else the policy shipped with the default cohort where that fits
    (`promptenv.shipped`), and trains one otherwise; ``train`` always trains; ``shipped``
    refuses to train (`promptenv.steps.workspace_policy`).
    """
    ws = _workspace(workspace)
    prompt_methods = list(prompt_methods or ["pmlm_initial"])
    runner = make_task_runner(task_runner, dask_address)
    # the prompt table is written once, by refine, with the policy's prompts
    built = build(
        ws,
        source,
        methods=prompt_methods,
        batch_size=batch_size,
        with_prompts=False,
        ingest=ingest,
    )
    policy = train_policy(
        ws,
        backend,
        built.recommender,
        quick_policy_settings(policy_timesteps, n_calibration, n_train=policy_encounters),
        policy_source,
    )
    refined = refine.with_options(task_runner=runner)(
        ws, policy.version, prompt_methods, batch_size=batch_size
    )
    evaluation = evaluate(
        ws,
        backend,
        eval_methods or list(MAIN_JOB_METHODS),
        n_obstetric=n_obstetric,
        n_adult=n_adult,
        n_calibration=n_calibration,
        make_up=True,
    )
    exported = export(ws, [*prompt_methods, "pmlm"])
    publish_flow_summary(
        "pmlm-pipeline",
        cohort=built.summary,
        recommender=built.recommender,
        recommender_rows=built.fit.validation if built.fit is not None else None,
        methods=pd.DataFrame(evaluation.table),
        llm=evaluation.llm,
        report=evaluation.report.parent / HTML_FILE,
        notes=[policy.describe(), _prompts_note(refined), _export_note(exported)],
    )
    return PipelineOutcome(built, policy, refined, evaluation, exported)


@flow(name="pmlm-train-policy")
def train_policy(
    workspace: str | None,
    backend: str,
    recommender: str,
    settings: PolicySettings,
    source: str = "auto",
) -> PolicyOutcome:
    """Train the prompt-editing policy with MaskablePPO (`promptenv.policy`), answers from
    ``backend``, or install the shipped one where ``source`` allows and it fits
    (`promptenv.steps.workspace_policy`).

    Cached by the data fingerprint, the recommender, the LLM, the settings and the
    source: a rerun on the same inputs reuses the saved policy.
    """
    ws = _workspace(workspace)
    get_run_logger().info(
        f"the prompt-editing policy (MaskablePPO): {POLICY_SOURCES.get(source, source)}"
    )
    fingerprint = fingerprint_records(ws)
    outcome: PolicyOutcome = in_workspace(train_policy_task, ws)(
        ws, backend, fingerprint, recommender, settings, source
    )
    if saved_policy_version(Workspace.at(ws)) != outcome.version:
        # a cache hit whose saved policy was deleted or replaced since (`pmlm policy train`)
        outcome = in_workspace(train_policy_task, ws, refresh=True)(
            ws, backend, fingerprint, recommender, settings, source
        )
    publish_flow_summary("pmlm-train-policy", notes=[outcome.describe()])
    return outcome


@flow(name="pmlm-refine", task_runner=make_task_runner())
def refine(
    workspace: str | None,
    policy_version: str,
    methods: list[str] | None = None,
    which: str = "latest",
    batch_size: int = 32,
) -> RefreshResult:
    """Add the policy's refined prompts (method ``pmlm``, no LLM call) to the prompt table."""
    ws = _workspace(workspace)
    chosen = tuple(dict.fromkeys([*(methods or ["pmlm_initial"]), "pmlm"]))
    spec = PromptTableSpec(chosen, which, batch_size=batch_size, policy_version=policy_version)  # type: ignore[arg-type]
    refined = _prompt_table(ws, spec, False)
    publish_flow_summary("pmlm-refine", notes=[_prompts_note(refined)])
    return refined
