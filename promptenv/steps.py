"""The prompt steps on a workspace: prompts, policy, evaluation, export.

Each is a plain function over a workspace folder, like `recsys.steps`: the
``pmlm`` commands (`flows.cli*`) and the Prefect tasks (`flows.tasks`) are thin
wrappers that call the same functions, so a notebook or a test can too. Steps
return what they wrote; they never print (a ``progress`` callback receives
their progress lines).

Usage::

    ws = Workspace.at("pmlm-workspace")
    table = build_workspace_prompts(ws, ["pmlm_initial"], "latest")
    written = export_workspace(ws)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.errors import InputError
from pipelines.export import ExportResult
from pipelines.ingest import load_tables
from pipelines.schemas import PATIENT_TABLES
from pipelines.workspace import MissingTableError, Workspace, atomic_write_bytes
from promptenv.encounters import CALIBRATION_ENCOUNTERS
from promptenv.evaluate import EvalSettings, Evaluation, gap_note
from promptenv.fragments import PatientSignals
from promptenv.llm import LLMClient
from promptenv.policy import Policy, PolicySettings, TrainedPolicy, load_policy
from promptenv.policy_info import (
    INFO_FILE,
    PolicyInfo,
    policy_dir,
    policy_info_path,
    saved_policy_version,
)
from promptenv.prompt_table import PROMPT_TABLE, Which, build_prompt_table, write_prompt_table
from promptenv.prompts import METHODS
from recsys.type_aliases import Progress, Tick

if TYPE_CHECKING:
    from promptenv.judge import PlanJudge


#: Methods of the prompt table: every fixed method but ``oracle`` (it lists the answer).
TABLE_METHODS = tuple(m for m in METHODS if m != "oracle")
WHICH = ("latest", "test", "all")
#: The canonical tables the prompts are built from: their bytes make the export's ``input_data_hash``.
INPUT_TABLES = PATIENT_TABLES
#: Every export form (`pipelines.export.FORMATS`).
EXPORT_FORMATS = ("parquet", "jsonl", "sql")


def parse_methods(value: str | Sequence[str], allowed: Sequence[str] = TABLE_METHODS) -> list[str]:
    """``value`` (comma-separated, or a list) as methods; InputError naming the unknown ones."""
    names = value.split(",") if isinstance(value, str) else list(value)
    methods = [m.strip() for m in names if m.strip()]
    bad = [m for m in methods if m not in allowed]
    if bad or not methods:
        raise InputError(f"unknown method(s) {bad}; choose from {', '.join(allowed)}")
    return methods


def check_which(which: str) -> Which:
    """``which`` as a `Which` (latest, test or all); InputError otherwise."""
    if which not in WHICH:
        raise InputError(f"--which must be {', '.join(WHICH[:-1])} or {WHICH[-1]}, not {which!r}")
    return which  # type: ignore[return-value]


# --------------------------------------------------------------------------- prompts


class WorkspaceSignals:
    """Signals of the workspace's selected recommender, computed on demand (`promptenv.signals`)."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def __call__(self, encounter_ids: Sequence[str]) -> Mapping[str, PatientSignals]:
        from promptenv.signals import signals_for

        return signals_for(self.workspace, encounter_ids)


def build_workspace_prompts(
    ws: Workspace, methods: Sequence[str], which: str = "latest", policy: Policy | None = None
) -> pd.DataFrame:
    """The prompt table of ``methods`` for the chosen encounters, written to ``tables/prompts.parquet``."""
    table = build_prompt_table(
        load_tables(ws), methods, WorkspaceSignals(ws), check_which(which), policy=policy
    )
    with ws.transaction("prompts") as txn:  # the table and its manifest entry, together
        write_prompt_table(ws, table)
        txn.record_step(
            "prompts",
            {
                "rows": len(table),
                "patients": int(table["patient_id"].nunique()),
                "methods": list(methods),
                "which": which,
                "output": str(ws.table_path(PROMPT_TABLE)),
            },
        )
    return table


def patient_prompts(
    ws: Workspace, patient: str, methods: Sequence[str], encounter: str | None = None
) -> pd.DataFrame:
    """One patient's prompts (her latest index encounter, or ``encounter``), not written anywhere."""
    tables = load_tables(ws)
    idx = tables["index_encounters"]
    mine = idx[idx["patient_id"] == patient]
    if mine.empty:
        raise InputError(f"patient {patient!r} has no index encounter in {ws.root}")
    if encounter is not None:
        mine = mine[mine["encounter_id"] == encounter]
        if mine.empty:
            raise InputError(f"{encounter!r} is not an index encounter of {patient!r}")
    row = mine.sort_values("index_time").tail(1)
    return build_prompt_table(
        {**tables, "index_encounters": row}, methods, WorkspaceSignals(ws), "all"
    )


# --------------------------------------------------------------------------- policy


def workspace_versions(ws: Workspace) -> dict[str, Any]:
    """The data and recommender versions a policy is trained with (from the workspace manifest)."""
    from recsys.steps import read_selection

    ingest = ws.read_manifest().get("steps", {}).get("ingest", {})
    selection = read_selection(ws)
    return {
        "data_hash": ingest.get("data_hash"),
        "data_input": ingest.get("input"),
        "recommender": selection.get("best"),
        "recommender_vocabulary": selection.get("vocabulary_fingerprint"),
    }


def train_workspace_policy(
    ws: Workspace,
    backend: str,
    settings: PolicySettings,
    extra_versions: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    tick: Tick | None = None,
) -> TrainedPolicy:
    """Train the workspace's policy (`promptenv.policy.train_policy`) on its tables and signals,
    answers from ``backend`` through the workspace's cached LLM client, scored with the
    workspace's calibration for that LLM (`promptenv.calibration.workspace_calibration`);
    saved in ``models/policy``."""
    from promptenv.calibration import workspace_calibration
    from promptenv.policy import train_policy

    client, tables = LLMClient(backend, workspace=ws), load_tables(ws)
    calibration = workspace_calibration(
        ws, client, tables, settings.n_calibration, params=settings.params, progress=progress
    )
    return train_policy(
        client,
        tables,
        WorkspaceSignals(ws),
        policy_dir(ws),
        settings,
        versions={**workspace_versions(ws), **(extra_versions or {})},
        progress=progress,
        tick=tick,
        calibration=calibration,
    )


#: Where the main job's policy comes from (`workspace_policy`).
#: Where the main job's policy comes from (`workspace_policy`), and what each one means.
POLICY_SOURCES = {
    "auto": "the workspace's own or the shipped one where it fits, else trained now",
    "train": "trained now",
    "shipped": "the shipped one, never trained",
}


@dataclass(frozen=True)
class WorkspacePolicy:
    """The workspace's policy after `workspace_policy`: trained now or the shipped one."""

    policy: Policy
    path: Path
    #: "" when trained now; else the command that trained the shipped policy
    shipped_by: str = ""


def workspace_policy(
    ws: Workspace,
    backend: str,
    settings: PolicySettings,
    extra_versions: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    tick: Tick | None = None,
    source: str = "auto",
) -> WorkspacePolicy:
    """The main job's policy, by ``source`` (`POLICY_SOURCES`):

    - ``auto``: the policy trained in the workspace (``pmlm policy train``, an earlier
      ``--policy train``) where it fits the workspace's data, recommender and LLM
      (`promptenv.shipped.policy_mismatch`); else the shipped one (`promptenv.shipped`)
      where it fits; else one trained now (`train_workspace_policy`);
    - ``shipped``: the shipped one, or an error saying why it does not fit;
    - ``train``: one trained now.
    """
    from promptenv.policy import read_policy_info
    from promptenv.shipped import (
        PROVENANCE_FILE,
        SHIPPED_POLICY,
        install_shipped_policy,
        policy_mismatch,
        shipped_provenance,
    )

    if source not in POLICY_SOURCES:
        raise InputError(f"policy source {source!r} is not one of {', '.join(POLICY_SOURCES)}")
    say = progress or (lambda _m: None)
    if source != "train":
        versions = {**workspace_versions(ws), "llm": LLMClient(backend, workspace=ws).label}
        own = policy_dir(ws)
        # an installed shipped policy carries its provenance: the shipped one decides
        if source == "auto" and (own / INFO_FILE).exists() and not (own / PROVENANCE_FILE).exists():
            info = read_policy_info(own)
            if policy_mismatch(info, versions) is None:
                say(
                    f"policy {info.version}: the one trained in this workspace, on its data, "
                    "recommender and LLM, kept (`--policy train` trains anew)"
                )
                return WorkspacePolicy(load_policy(own), own)
        why = (
            policy_mismatch(read_policy_info(SHIPPED_POLICY), versions)
            if (SHIPPED_POLICY / INFO_FILE).exists()
            else f"{SHIPPED_POLICY} holds no policy: reinstall PMLM"
        )
        if why is None:
            policy = install_shipped_policy(ws, SHIPPED_POLICY)
            command = str(shipped_provenance(SHIPPED_POLICY).get("command", ""))
            say(
                f"policy {policy.version}: the one shipped with the default cohort (trained "
                f"by `{command}`); this workspace's data, recommender and LLM are those it "
                "was trained with, so the main job does not train one"
            )
            return WorkspacePolicy(policy, own, command)
        if source == "shipped":
            raise InputError(
                f"the shipped policy does not fit this workspace: {why}; train one with "
                "`pmlm run --policy train` or `pmlm policy train`"
            )
        say(f"the shipped policy does not fit this workspace ({why}): training one")
    result = train_workspace_policy(ws, backend, settings, extra_versions, progress, tick)
    return WorkspacePolicy(result.policy, result.path)


def quick_policy_settings(
    timesteps: int, n_calibration: int = CALIBRATION_ENCOUNTERS, n_train: int = 8
) -> PolicySettings:
    """The main job's short training run: a few hundred edits on ``n_train`` training and
    ``3 * n_train // 2`` validation encounters, at most ``8 * n_train`` LLM calls (the
    initial prompts' and the start choice's answers included), so that the main job stays
    within minutes. The validation encounters are the most of it: they choose the start
    prompt (the best fixed one) that a short training falls back to, and on the default
    cohort's validation patients a choice on 4 encounters agreed with the choice on 24 in
    52% of random draws, on 8 in 62%, on 12 in 70% (BENCHMARKS.md, "Start prompt").
    `pmlm policy train` trains longer (see BENCHMARKS.md); the matching threshold
    is the workspace's calibration, which the main job's evaluation reuses.
    """
    if n_train < 2:
        raise InputError(f"the policy needs at least 2 training encounters, got {n_train}")
    return PolicySettings(
        n_train=n_train,
        n_validation=max(2, 3 * n_train // 2),
        timesteps=timesteps,
        n_steps=64,
        batch_size=64,
        eval_freq=max(64, timesteps // 2),
        max_llm_calls=8 * n_train,
        n_calibration=n_calibration,
    )


def apply_workspace_policy(
    ws: Workspace, which: str = "latest", keep_initial: bool = True
) -> tuple[pd.DataFrame, Policy]:
    """Refine prompts with the trained policy (no LLM call); writes the prompt table.

    Returns the table and the policy; with ``keep_initial`` the table also holds
    the PMLM initial prompts.
    """
    policy = load_policy(policy_dir(ws))
    methods = ["pmlm_initial", "pmlm"] if keep_initial else ["pmlm"]
    return build_workspace_prompts(ws, methods, which, policy=policy), policy


def policy_if_needed(ws: Workspace, names: Sequence[str]) -> Policy | None:
    """The workspace's policy when pmlm or random_edits is asked for (random edits mimic its counts)."""
    if "pmlm" in names:
        return load_policy(policy_dir(ws))
    if "random_edits" in names and policy_info_path(policy_dir(ws)).exists():
        return load_policy(policy_dir(ws))
    return None


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvaluationFiles:
    """What `write_evaluation` wrote under ``reports/``."""

    table: Path  # evaluation.md: the methods table and the paired differences
    report: Path  # report.md, with plots
    html: Path  # report.html: the same, self-contained, with a page per sampled patient
    #: one sentence: did the policy beat the best fixed prompt and the bare question
    #: (`promptenv.verdict`; "" when the policy was not evaluated)
    verdict: str = ""


def budgeted_client(backend: str, ws: Workspace, max_calls: int | None) -> LLMClient:
    """The workspace's cached LLM client for ``backend``, with at most ``max_calls`` new calls
    (0: none; None: no limit)."""
    from promptenv.llm import Budget

    return LLMClient(
        backend, workspace=ws, budget=Budget(max_calls=max_calls) if max_calls is not None else None
    )


def check_eval_methods(names: Sequence[str]) -> list[str]:
    """The evaluation's methods: fixed ones, pmlm, random_edits, search_N, search_last_N."""
    from promptenv.search import is_edit_method

    chosen = [m.strip() for m in names if m.strip()]
    bad = [m for m in chosen if not is_edit_method(m) and m not in METHODS]
    if bad or not chosen:
        raise InputError(
            f"unknown method(s) {bad}; choose from {', '.join(METHODS)}, "
            "pmlm, random_edits, search_N, search_last_N"
        )
    return chosen


def evaluate_workspace(
    ws: Workspace,
    client: LLMClient,
    names: Sequence[str],
    settings: EvalSettings,
    *,
    progress: Progress,
    policy: Policy | None = None,
    judge: PlanJudge | None = None,
    tick: Callable[[int, int], None] | None = None,
) -> tuple[Evaluation, EvaluationFiles]:
    """The methods ``names`` (fixed prompts, pmlm, random_edits, search_N) on the same
    test encounters with ``client``; writes reports/ and returns the result and its files.
    ``policy``: the workspace's, for pmlm and random_edits (`policy_if_needed`). Answers are
    scored with the workspace's calibration for ``client``'s LLM (the one training used).
    ``tick(done, total)`` follows the LLM's answers.
    """
    from promptenv.calibration import evaluation_calibration
    from promptenv.evaluate import evaluate_methods
    from promptenv.search import edit_methods, is_edit_method

    tables = load_tables(ws)
    calibration = evaluation_calibration(client, tables, settings, ws, progress)
    result = evaluate_methods(
        client,
        tables,
        WorkspaceSignals(ws),
        [m for m in names if not is_edit_method(m)],
        settings,
        progress=progress,
        edit_methods=edit_methods([m for m in names if is_edit_method(m)], policy),
        judge=judge,
        calibration=calibration,
        tick=tick,
    )
    return result, write_evaluation(ws, result, client)


def write_evaluation(ws: Workspace, result: Evaluation, client: LLMClient) -> EvaluationFiles:
    """Write the evaluation's rows (parquet), table (Markdown, JSON) and report with plots to reports/.

    The reports (`promptenv.report`, `promptenv.report_html`) carry the recommender
    comparison of `pmlm recsys evaluate` and the policy's training curve when there are.
    """
    from promptenv.evaluate import markdown_table
    from promptenv.paired import paired_section
    from promptenv.report import write_report
    from promptenv.report_html import write_html_report
    from promptenv.verdict import closing_verdict

    ws.reports_dir.mkdir(parents=True, exist_ok=True)
    result.results.to_parquet(ws.reports_dir / "evaluation_results.parquet", index=False)
    stats = client.cache_stats
    header = (
        f"# Methods compared\n\nLLM: {result.llm}. Matching threshold {result.calibration['threshold']} "
        f"({result.calibration['chosen_on']}). LLM cache: {stats.hits} hits, {stats.misses} misses.\n\n"
        "Means with bootstrap 95% confidence intervals; gap closed = (method − general) / (oracle − general) "
        f"on plan-item recall. {gap_note(result.table)}\n\n"
    )
    path = ws.reports_dir / "evaluation.md"
    settings = EvalSettings()
    section = paired_section(result.results, settings)
    paired = "\n\n" + section if section else ""
    # the same resamples as the paired table: its figures are the sentence's, sign flipped
    sentence = closing_verdict(result.results, reps=settings.bootstrap, seed=settings.seed)
    closing = f"\n\n**{sentence}**" if sentence else ""
    atomic_write_bytes(
        path, (header + markdown_table(result.table) + paired + closing + "\n").encode()
    )
    atomic_write_bytes(
        ws.reports_dir / "evaluation.json",
        json.dumps(
            {
                "llm": result.llm,
                "calibration": result.calibration,
                "table": result.table.to_dict(orient="records"),
            },
            indent=2,
            default=float,
        ).encode(),
    )
    recsys_csv = ws.reports_dir / "recsys_comparison.csv"
    recsys = pd.read_csv(recsys_csv) if recsys_csv.exists() else None
    report = write_report(ws.reports_dir, result, recsys, (stats.hits, stats.misses))
    info = policy_info_path(policy_dir(ws))
    trained = PolicyInfo.from_json(_read_json(info)) if info.exists() else None
    html = write_html_report(ws.reports_dir, result, recsys, trained, (stats.hits, stats.misses))
    return EvaluationFiles(path, report, html, sentence)


# --------------------------------------------------------------------------- export


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path} is not valid JSON ({exc}): rewrite it with the step that made it"
        ) from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def read_prompt_table(ws: Workspace) -> pa.Table:
    """The workspace's prompt table as arrow (its own schema); an actionable error when absent."""
    path = ws.table_path(PROMPT_TABLE)
    if not path.exists():
        raise MissingTableError(
            f"{path} does not exist: build the prompt table first with "
            f"`pmlm prompts build -w {ws.root}` (or run the whole job with `pmlm run -w {ws.root}`)"
        )
    return pq.read_table(path)


def recommender_info(ws: Workspace, table: pa.Table) -> dict[str, Any]:
    """The selected recommender (``selection.json``, its saved metadata) and those the table names."""
    from recsys.steps import models_dir, read_selection

    in_table = sorted(v for v in set(table.column("recommender").to_pylist()) if v)
    selection = read_selection(ws)
    best = selection.get("best")
    info: dict[str, Any] = {"selected": best, "in_prompt_table": in_table}
    if best is None:
        return info
    chosen = selection.get("models", {}).get(best, {})
    info.update({k: v for k, v in chosen.items() if k != "params"})
    info["vocabulary_fingerprint"] = selection.get("vocabulary_fingerprint")
    saved = models_dir(ws) / str(best) / "recommender.json"
    if saved.exists():
        meta = _read_json(saved)
        info["params"] = meta.get("params", chosen.get("params"))
        info["format_version"] = meta.get("format_version")
    else:
        info["params"] = chosen.get("params")
    return info


def llm_label(ws: Workspace) -> str | None:
    """The LLM of the last evaluation: the manifest's ``steps.evaluate.llm``, else reports/evaluation.json."""
    step = ws.read_manifest().get("steps", {}).get("evaluate", {})
    if step.get("llm"):
        return str(step["llm"])
    report = ws.reports_dir / "evaluation.json"
    if report.exists():
        llm = _read_json(report).get("llm")
        return None if llm is None else str(llm)
    return None


def export_manifest_fields(ws: Workspace, table: pa.Table) -> dict[str, Any]:
    """What the export's manifest records about its inputs."""
    from pipelines.export import dataset_fingerprint

    return {
        "input_data_hash": dataset_fingerprint(ws, INPUT_TABLES),
        "input_tables": list(INPUT_TABLES),
        "recommender": recommender_info(ws, table),
        "policy_version": saved_policy_version(ws),
        "llm": llm_label(ws),
        "pmlm_version": metadata.version("pmlm"),
        "workspace": str(ws.root.resolve()),
    }


@dataclass(frozen=True)
class WorkspaceExport:
    """What `export_workspace` wrote, and the recommenders the table was built with but
    that are no longer the selected one (the table should be rebuilt)."""

    result: ExportResult
    target: Path
    stale_recommenders: tuple[str, ...]
    selected_recommender: str | None


def export_workspace(
    ws: Workspace,
    methods: Sequence[str] | None = None,
    formats: Sequence[str] = EXPORT_FORMATS,
    sql_url: str | None = None,
    out: Path | None = None,
) -> WorkspaceExport:
    """The prompt table (its rows of ``methods``, default all) → parquet, JSONL, SQL and a
    manifest of its inputs (`pipelines.export.export_table`) in ``out`` (default ``WORKSPACE/export``);
    recorded as the workspace's ``export`` step."""
    from pipelines.export import export_table

    table = read_prompt_table(ws)
    if methods is not None:
        present = set(table.column("method").to_pylist())
        missing = [m for m in methods if m not in present]
        if missing:
            raise MissingTableError(
                f"the prompt table {ws.table_path(PROMPT_TABLE)} has no rows of {missing} "
                f"(it holds {sorted(present)}): build them first, e.g. with the build flow's methods"
            )
        table = table.filter(pc.is_in(table.column("method"), value_set=pa.array(list(methods))))
    fields = export_manifest_fields(ws, table)
    if methods is not None:
        fields["methods"] = list(methods)
    target = out if out is not None else ws.root / "export"
    result = export_table(
        table, target, name=PROMPT_TABLE, formats=list(formats), sql_url=sql_url, manifest=fields
    )
    step = {
        "rows": result.rows,
        "files": result.files,
        "manifest": str(result.manifest_path),
        "input_data_hash": fields["input_data_hash"],
    }
    ws.record_step("export", step | ({"methods": list(methods)} if methods is not None else {}))
    recommender = fields["recommender"]
    selected = recommender["selected"]
    stale = tuple(r for r in recommender["in_prompt_table"] if r != selected)
    return WorkspaceExport(result, target, stale if selected is not None else (), selected)
