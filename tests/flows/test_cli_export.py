"""`pmlm export` on a real workspace: the default cohort, fitted baselines, a small prompt table."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.cli_export import DEFAULT_FORMATS
from pipelines.errors import ConfigError, InputError, MissingStepError
from pipelines.export import FORMATS, dataset_fingerprint
from pipelines.workspace import Workspace
from promptenv.prompt_table import PROMPT_TABLE
from promptenv.steps import INPUT_TABLES

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """The default cohort, both baselines fitted, the prompts of 12 patients' latest encounters."""
    from pipelines.cohort import prepare_default_cohort
    from pipelines.ingest import load_tables
    from promptenv.prompt_table import build_prompt_table, write_prompt_table
    from promptenv.steps import WorkspaceSignals
    from recsys.steps import fit_models

    ws = Workspace.at(tmp_path_factory.mktemp("export-ws"))
    prepare_default_cohort(ws)
    fit_models(ws, ["popularity", "repeat_previous"], blend=False)
    tables = load_tables(ws)
    index = tables["index_encounters"]
    some = sorted(index["patient_id"].unique())[:12]
    tables["index_encounters"] = index[index["patient_id"].isin(some)]
    prompts = build_prompt_table(
        tables, ["pmlm_initial", "general"], WorkspaceSignals(ws), "latest"
    )
    write_prompt_table(ws, prompts)
    return ws


def test_without_a_prompt_table_it_says_what_to_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "-w", str(tmp_path)])
    assert result.exit_code == MissingStepError.exit_code
    assert "prompts.parquet does not exist" in result.output
    assert "pmlm prompts build" in result.output and "pmlm run" in result.output
    assert not (tmp_path / "export").exists()


def test_export_writes_every_form_and_a_manifest_of_its_inputs(workspace: Workspace) -> None:
    ws = workspace
    result = runner.invoke(app, ["export", "-w", str(ws.root)])
    assert result.exit_code == 0, result.output
    out = ws.root / "export"
    source = pq.read_table(ws.table_path(PROMPT_TABLE))
    assert pq.read_table(out / "prompts.parquet").equals(source)
    assert len((out / "prompts.jsonl").read_text().splitlines()) == source.num_rows
    with sqlite3.connect(out / "prompts.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0] == source.num_rows

    manifest = json.loads((out / "prompts.manifest.json").read_text())
    assert manifest["rows"] == source.num_rows == 24
    assert manifest["formats"] == list(FORMATS)
    assert manifest["input_data_hash"] == dataset_fingerprint(ws, INPUT_TABLES)
    assert manifest["input_tables"] == list(INPUT_TABLES)
    selection = json.loads((ws.models_dir / "recsys" / "selection.json").read_text())
    recommender = manifest["recommender"]
    assert recommender["selected"] == selection["best"] == "repeat_previous"
    assert recommender["in_prompt_table"] == ["repeat_previous"]
    saved = json.loads(
        (ws.models_dir / "recsys" / "repeat_previous" / "recommender.json").read_text()
    )
    assert recommender["params"] == saved["params"]  # every parameter, defaults included
    assert (
        recommender["validation_ndcg@10"]
        == selection["models"]["repeat_previous"]["validation_ndcg@10"]
    )
    assert recommender["vocabulary_fingerprint"] == selection["vocabulary_fingerprint"]
    assert recommender["format_version"] == 1
    assert manifest["policy_version"] is None and manifest["llm"] is None
    assert manifest["workspace"] == str(ws.root.resolve())
    step = ws.read_manifest()["steps"]["export"]
    assert step["rows"] == 24 and step["input_data_hash"] == manifest["input_data_hash"]
    assert "24 prompts exported" in result.output and "Note:" not in result.output

    # a trained policy and an evaluation are recorded when present
    (ws.models_dir / "policy").mkdir(parents=True)
    (ws.models_dir / "policy" / "policy.json").write_text(json.dumps({"version": "0a1b2c3d4e5f"}))
    ws.record_step("evaluate", {"llm": "local:SmolLM2-135M-Instruct"})
    again = runner.invoke(app, ["export", "-w", str(ws.root), "--out", str(ws.root / "again")])
    assert again.exit_code == 0, again.output
    second = json.loads((ws.root / "again" / "prompts.manifest.json").read_text())
    assert second["policy_version"] == "0a1b2c3d4e5f"
    assert second["llm"] == "local:SmolLM2-135M-Instruct"
    assert second["input_data_hash"] == manifest["input_data_hash"]


def test_export_options_and_their_errors(workspace: Workspace, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    result = runner.invoke(
        app,
        [
            "export",
            *("-w", str(workspace.root), "--out", str(tmp_path / "out")),
            *("--formats", "jsonl, sql", "--sql-url", url),
        ],
    )
    assert result.exit_code == 0, result.output
    # .lock: the export's advisory lock (pipelines.lock), beside the files it guards
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != ".lock") == [
        "prompts.jsonl",
        "prompts.manifest.json",
    ]
    with sqlite3.connect(tmp_path / "app.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0] == 24

    bad = runner.invoke(app, ["export", "-w", str(workspace.root), "--formats", "parquet,xlsx"])
    assert bad.exit_code == InputError.exit_code
    assert "'xlsx'" in bad.output and "parquet, jsonl, sql" in bad.output

    secret = runner.invoke(
        app,
        [
            "export",
            *("-w", str(workspace.root), "--out", str(tmp_path / "o2")),
            *("--sql-url", "nosuchdb://app:hunter2@db/pmlm"),
        ],
    )
    assert secret.exit_code == ConfigError.exit_code
    assert "nosuchdb://app:***@db/pmlm" in secret.output and "hunter2" not in secret.output


def test_a_recommender_changed_since_the_prompts_were_built_is_pointed_out(
    workspace: Workspace, tmp_path: Path
) -> None:
    path = workspace.models_dir / "recsys" / "selection.json"
    original = path.read_text()
    selection = json.loads(original)
    selection["best"] = "popularity"
    path.write_text(json.dumps(selection))
    try:
        result = runner.invoke(
            app, ["export", "-w", str(workspace.root), "--out", str(tmp_path), "--formats", "jsonl"]
        )
    finally:
        path.write_text(original)
    assert result.exit_code == 0, result.output
    assert "built with repeat_previous" in result.output and "pmlm prompts build" in result.output
    manifest = json.loads((tmp_path / "prompts.manifest.json").read_text())
    assert manifest["recommender"]["selected"] == "popularity"
    assert manifest["recommender"]["in_prompt_table"] == ["repeat_previous"]


def test_the_default_formats_are_every_export_form() -> None:
    assert DEFAULT_FORMATS.split(",") == list(FORMATS)
    help_text = runner.invoke(app, ["export", "--help"])
    assert help_text.exit_code == 0 and "--sql-url" in help_text.output
    assert "WORKSPACE/export" in help_text.output  # no default swallowed as rich markup


def test_the_export_never_holds_the_crosswalk_or_the_secret(
    workspace: Workspace, tmp_path: Path
) -> None:
    """The crosswalk (source id → pseudonym) and the pseudonym secret stay on premises:
    no exported file, row or manifest entry carries them."""
    import shutil

    import pandas as pd

    from pipelines.identity import private_dir, workspace_salt, write_crosswalk

    ws = Workspace.at(tmp_path / "ws")
    shutil.copytree(workspace.root, ws.root)
    pseudonyms = sorted(set(pq.read_table(ws.table_path(PROMPT_TABLE))["patient_id"].to_pylist()))
    source_ids = [f"MRN-{i:06d}-SOURCE" for i in range(len(pseudonyms))]
    crosswalk = pd.DataFrame(
        {"source_system": "fhir", "source_id": source_ids, "patient_id": pseudonyms}
    )
    write_crosswalk(ws, crosswalk, None, None)
    secret = workspace_salt(ws)
    assert (private_dir(ws) / "crosswalk.parquet").exists()
    url = f"sqlite:///{tmp_path / 'app.db'}"
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "export",
            "-w",
            str(ws.root),
            "--out",
            str(out),
            "--formats",
            "parquet,jsonl,sql",
            "--sql-url",
            url,
        ],
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert not any("crosswalk" in n or "key" in n or "private" in n for n in names), names
    texts = [(out / "prompts.jsonl").read_text(), (out / "prompts.manifest.json").read_text()]
    texts.append(pd.read_parquet(out / "prompts.parquet").to_json(date_format="iso"))
    with sqlite3.connect(tmp_path / "app.db") as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        texts.append(json.dumps(conn.execute("SELECT * FROM prompts").fetchall(), default=str))
    assert tables == ["prompts"]
    for text in texts:
        assert "MRN-" not in text and secret not in text and "crosswalk" not in text
    assert set(pd.read_parquet(out / "prompts.parquet")["patient_id"]) == set(pseudonyms)
