"""The Prefect flows on the built-in default cohort: build, its cache, the incremental refresh,
Dask, and the deployments of ``pmlm serve``.

One build (``built_workspace``, ~1 min) is shared; tests that change files work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipelines.integrity import MAGIC
from pipelines.sources import SourceTables

runner = CliRunner()


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)  # file times kept: copy2
    return target


def _prompts(root: Path) -> pd.DataFrame:
    return pd.read_parquet(root / "tables" / "prompts.parquet")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_build_writes_every_patients_prompt_as_the_prompt_table_module_does(
    built_workspace: Path,
) -> None:
    from pipelines.ingest import load_tables
    from pipelines.workspace import Workspace
    from promptenv.prompt_table import build_prompt_table
    from promptenv.steps import WorkspaceSignals

    table = _prompts(built_workspace)
    index = pd.read_parquet(built_workspace / "tables" / "index_encounters.parquet")
    assert len(table) == index["patient_id"].nunique() == table["patient_id"].nunique()
    assert (table["method"] == "pmlm_initial").all()
    assert table["system"].str.contains("likely to need next").mean() > 0.9
    # the batched build gives the prompts of one whole-cohort call of the prompt-table module
    ws = Workspace.at(built_workspace)
    whole = build_prompt_table(load_tables(ws), ["pmlm_initial"], WorkspaceSignals(ws), "latest")
    columns = ["encounter_id", "patient_id", "method", "system", "question", "tokens", "config"]
    pd.testing.assert_frame_equal(
        table[columns],
        whole.sort_values("patient_id")[columns].reset_index(drop=True),
        check_dtype=False,  # the file's int32 tokens
    )
    steps = json.loads((built_workspace / "manifest.json").read_text())["steps"]
    assert steps["prompts"]["rows"] == len(table)
    assert (built_workspace / "cache" / "refresh" / "build.json").exists()
    records = [p for p in (built_workspace / "cache" / "prefect").rglob("*") if p.is_file()]
    assert records, "no cached task results"
    unsigned = [p.name for p in records if not p.read_bytes().startswith(MAGIC)]
    assert not unsigned, f"cached task results without the workspace's signature: {unsigned}"


@pytest.mark.slow
def test_a_second_build_does_not_refit_nor_recompute(built_workspace: Path, tmp_path: Path) -> None:
    from flows.pipeline import build

    ws = _copy(built_workspace, tmp_path / "ws")
    models = sorted((ws / "models").rglob("*"))
    assert any(p.name == "recommender.json" for p in models)
    written = {p: p.stat().st_mtime_ns for p in models if p.is_file()}
    table_sha = _sha256(ws / "tables" / "prompts.parquet")

    outcome = build(workspace=str(ws))

    assert {p: p.stat().st_mtime_ns for p in written} == written, "the recommenders were refit"
    assert outcome.fit is not None and outcome.fit.best == outcome.recommender
    assert outcome.prompts.recomputed_patients == 0
    assert outcome.prompts.patients == len(_prompts(ws))
    assert _sha256(ws / "tables" / "prompts.parquet") == table_sha


@pytest.mark.slow
def test_a_failing_batch_fails_the_build_with_its_own_error(
    built_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch task that fails raises its error from the build, not an AttributeError on the
    None that Prefect returns for a task handed a failed future."""
    import promptenv.prompt_table as prompt_table
    from flows.pipeline import build

    ws = _copy(built_workspace, tmp_path / "ws")
    shutil.rmtree(ws / "cache" / "prefect")  # no cached signals: every batch runs
    table_sha = _sha256(ws / "tables" / "prompts.parquet")
    computed = prompt_table.batch_signals

    def failing(plan, batch):  # type: ignore[no-untyped-def]
        if batch.index == 1:
            raise RuntimeError("batch 1 failed on purpose")
        return computed(plan, batch)

    monkeypatch.setattr(prompt_table, "batch_signals", failing)
    with pytest.raises(RuntimeError, match="batch 1 failed on purpose"):
        build(workspace=str(ws), full=True)
    assert _sha256(ws / "tables" / "prompts.parquet") == table_sha, "a failed build wrote"


def _new_condition(source: SourceTables, patient: str, at: pd.Series, tag: str) -> SourceTables:
    """One more (ongoing) condition of ``patient``, recorded at index encounter ``at``:
    another patient's condition that she does not have. Appended: other rows keep their order."""
    events = source.events
    hers = set(events.loc[events["patient_id"] == patient, "display"].dropna())
    others = events[
        (events["kind"] == "condition") & ~events["display"].isin(hers) & events["end_time"].isna()
    ]
    row = others.iloc[[0]].assign(
        event_id=f"late-{tag}-{patient}",
        patient_id=patient,
        encounter_id=at["encounter_id"],
        time=at["index_time"],
        recorded_time=at["index_time"],
    )
    return replace(source, events=pd.concat([events, row], ignore_index=True))


@pytest.mark.slow
def test_refresh_recomputes_only_the_changed_patients_and_equals_a_full_recompute(
    built_workspace: Path, tmp_path: Path
) -> None:
    from flows.pipeline import refresh
    from pipelines.cohort import load_snapshot
    from pipelines.ingest import write_cohort
    from pipelines.workspace import Workspace
    from promptenv.prompt_table import refresh_prompt_table

    before = _prompts(built_workspace)
    index = pd.read_parquet(built_workspace / "tables" / "index_encounters.parquet")
    split = index.groupby("patient_id")["split"].first()
    # a training patient (a peer of others) gets a condition in the middle of her record,
    # a test patient one at her latest index encounter (her current prompt)
    trainee = sorted(split[split == "train"].index)[5]
    tested = sorted(split[split == "test"].index)[2]
    hers = index[index["patient_id"] == trainee].sort_values("index_time")
    latest = index[index["patient_id"] == tested].sort_values("index_time").iloc[-1]
    changed = _new_condition(load_snapshot(), trainee, hers.iloc[len(hers) // 2], "mid")
    changed = _new_condition(changed, tested, latest, "latest")

    ws = _copy(built_workspace, tmp_path / "refreshed")
    # the new records arrive (a re-ingest); a copy will recompute everything on them
    write_cohort(Workspace.at(ws), changed, input_description="late records")
    full = _copy(ws, tmp_path / "recomputed")

    outcome = refresh(workspace=str(ws), source="workspace")
    ticks: list[tuple[int, int]] = []
    recomputed = refresh_prompt_table(
        Workspace.at(full), full=True, tick=lambda done, total: ticks.append((done, total))
    )
    assert ticks == [(i + 1, recomputed.batches) for i in range(recomputed.batches)]

    result = outcome.build.prompts
    assert outcome.build.fit is None, "a refresh must not refit"
    assert recomputed.recomputed_patients == result.patients == len(before)
    assert result.reasons["records"] == 2 and result.full_reason is None
    # the two changed patients, plus those who had the training patient among their 20 peers
    # (her changed state may change what they are told): far from everyone
    assert result.reasons["records"] + result.reasons["peers"] + result.reasons["states"] == (
        result.recomputed_patients
    )
    assert result.recomputed_patients <= 0.2 * result.patients
    after = _prompts(ws)
    assert after.drop(columns="created_at").equals(_prompts(full).drop(columns="created_at"))
    text_changed = set(after.loc[after["system"] != before["system"], "patient_id"])
    # her condition at her latest index encounter is her most recent problem; the trainee's,
    # in the middle of her record, may be crowded out of her current prompt by later ones
    assert tested in text_changed
    rebuilt = set(after.loc[after["created_at"] != before["created_at"], "patient_id"])
    assert {trainee, tested} <= rebuilt and len(rebuilt) == result.recomputed_patients
    manifest = json.loads((ws / "export" / "prompts.manifest.json").read_text())
    assert manifest["rows"] == len(after)


@pytest.mark.slow
def test_the_build_on_a_two_worker_dask_cluster_gives_the_same_prompt_table(
    built_workspace: Path, tmp_path: Path
) -> None:
    from flows.pipeline import build, make_task_runner

    ws = _copy(built_workspace, tmp_path / "ws")
    # other batches than the built workspace's: no batch result comes from the cache
    outcome = build.with_options(task_runner=make_task_runner("dask", n_workers=2))(
        workspace=str(ws), source="workspace", batch_size=20, full=True
    )
    assert outcome.prompts.batches == -(-outcome.prompts.patients // 20)
    assert outcome.prompts.recomputed_patients == outcome.prompts.patients
    on_dask = _prompts(ws).drop(columns="created_at")
    assert on_dask.equals(_prompts(built_workspace).drop(columns="created_at"))


def test_the_flows_fan_batches_out_to_a_bounded_pool_of_threads(prefect_server: str) -> None:
    """Prefect's default thread pool is unbounded: every batch of Eunomia's prompt table ran
    at once, each with its own copy of the training states (13.1 GB)."""
    import threading
    import time

    from prefect import flow, task

    from flows.pipeline import build, make_task_runner, refine, refresh

    lock, running, most = threading.Lock(), [0], [0]

    @task
    def batch(i: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.5)  # long beside a task run's overhead: unbounded, all 8 overlap
        with lock:
            running[0] -= 1
        return i

    @flow(task_runner=make_task_runner())
    def fan_out() -> list[int]:
        return list(batch.map(range(8)).result())

    assert fan_out() == list(range(8))
    assert most[0] <= 2  # 8 before the bound
    for fanned in (build, refresh, refine):
        assert fanned.task_runner == make_task_runner()  # the same bound (Prefect compares it)


def test_task_runner_and_source_are_checked() -> None:
    from flows.pipeline import make_task_runner
    from flows.tasks import prepare_cohort

    with pytest.raises(ValueError, match="threads or dask"):
        make_task_runner("ray")
    with pytest.raises(ValueError, match="needs --task-runner dask"):
        make_task_runner("threads", "tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="unknown data source 'csv:x'"):
        prepare_cohort.fn("ws", "csv:x")


def test_serve_deploys_a_nightly_refresh_and_an_on_demand_evaluation(tmp_path: Path) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    from flows.cli_serve import NIGHTLY_CRON, deployments

    nightly, on_demand = deployments(tmp_path / "ws", timezone="Europe/Paris", backend="openai:m")
    assert (nightly.flow_name, nightly.name) == ("pmlm-refresh", "nightly-refresh")
    assert nightly.entrypoint == "flows.pipeline.refresh"
    (schedule,) = [s.schedule for s in nightly.schedules or []]
    assert isinstance(schedule, CronSchedule)
    assert schedule.cron == NIGHTLY_CRON == "0 2 * * *"
    assert schedule.timezone == "Europe/Paris"
    assert nightly.parameters == {
        "workspace": str((tmp_path / "ws").resolve()),
        "source": "default",
    }
    assert (on_demand.flow_name, on_demand.name) == ("pmlm-evaluate", "on-demand-evaluation")
    assert not on_demand.schedules
    assert on_demand.parameters["backend"] == "openai:m"
    (weekly,) = [s.schedule for s in deployments(tmp_path, cron="30 3 * * 1")[0].schedules or []]
    assert isinstance(weekly, CronSchedule) and weekly.cron == "30 3 * * 1"


def test_serve_and_run_reject_bad_options_before_doing_anything(tmp_path: Path) -> None:
    from flows.cli import app

    result = runner.invoke(app, ["serve", "-w", str(tmp_path), "--cron", "every night"])
    assert result.exit_code == 2
    assert "Invalid cron string" in " ".join(result.output.split())
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        no_server = runner.invoke(app, ["serve", "-w", str(tmp_path)])
    assert no_server.exit_code == 1
    assert "needs a Prefect server" in no_server.output
    bad_runner = runner.invoke(app, ["run", "-w", str(tmp_path), "--task-runner", "ray"])
    assert bad_runner.exit_code == 2
    assert not (tmp_path / "tables").exists()


@pytest.mark.slow
def test_the_policy_flow_reruns_when_the_saved_policy_was_replaced(
    built_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache hit of the policy task stands only while the workspace still holds the policy
    it returned: one deleted, or replaced by ``pmlm policy train``, sends the task again."""
    from types import SimpleNamespace

    import promptenv.policy
    import promptenv.steps as steps
    from flows.pipeline import train_policy
    from pipelines.workspace import Workspace
    from promptenv.policy_info import PolicyInfo, PolicySettings, policy_dir

    ws = _copy(built_workspace, tmp_path / "ws")
    folder = policy_dir(Workspace.at(ws))
    calls: list[str] = []

    def save(version: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "policy.json").write_text(json.dumps({"version": version}))

    def fake_policy(*_a: object, **_k: object) -> steps.WorkspacePolicy:
        version = f"v{len(calls)}"
        calls.append(version)
        save(version)
        policy = SimpleNamespace(version=version, info=PolicyInfo())
        return steps.WorkspacePolicy(policy, folder)  # type: ignore[arg-type]

    monkeypatch.setattr(steps, "workspace_policy", fake_policy)
    monkeypatch.setattr(promptenv.policy, "training_summary", lambda _p: "trained")
    settings = PolicySettings(n_train=2, n_validation=2, timesteps=64)
    assert train_policy(str(ws), "local", "blend", settings).version == "v0"
    assert train_policy(str(ws), "local", "blend", settings).version == "v0"  # cache hit
    assert calls == ["v0"]
    save("trained-by-hand")  # `pmlm policy train` replaced it
    assert train_policy(str(ws), "local", "blend", settings).version == "v1"
    shutil.rmtree(folder)  # deleted
    assert train_policy(str(ws), "local", "blend", settings).version == "v2"
    assert calls == ["v0", "v1", "v2"]
