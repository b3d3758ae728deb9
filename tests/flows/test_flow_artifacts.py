"""The flow runs' Prefect artifacts: a summary per flow, the export manifest as a table, a link
to the HTML report; read back from the test server by their keys and the run that made them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from promptenv.artifacts import MANIFEST_KEY, REPORT_KEY


def artifacts_of(flow_run_id: UUID) -> dict[str, Any]:
    """The artifacts a flow run (or its tasks) created, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found if a.key}


def table_rows(artifact: Any) -> list[dict[str, str]]:
    data = artifact.data
    rows: list[dict[str, str]] = json.loads(data) if isinstance(data, str) else data
    return rows


@pytest.mark.slow
def test_export_and_evaluate_publish_their_artifacts(
    built_workspace: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stub_llm_server: Any,
) -> None:
    from flows.pipeline import evaluate, export

    ws = Path(shutil.copytree(built_workspace, tmp_path / "ws"))

    state = export(workspace=str(ws), return_state=True)
    outcome = state.result()
    published = artifacts_of(state.state_details.flow_run_id)
    assert set(published) == {"pmlm-export-summary", MANIFEST_KEY}
    manifest = json.loads(outcome.manifest.read_text())
    rows = {r["field"]: r["value"] for r in table_rows(published[MANIFEST_KEY])}
    assert rows["rows"] == str(outcome.rows) == str(manifest["rows"])
    assert rows["files.parquet.sha256"] == manifest["files"]["parquet"]["sha256"]
    assert rows["input_data_hash"] == manifest["input_data_hash"]
    summary = published["pmlm-export-summary"].data
    assert f"{outcome.rows} prompts" in summary and str(outcome.manifest) in summary

    stub = stub_llm_server(echo=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "stub-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    try:
        state = evaluate(
            workspace=str(ws),
            backend=f"openai:stub-model@{stub.url}/v1",
            methods=["general", "pmlm_initial", "oracle"],
            n_obstetric=1,
            n_adult=1,
            n_calibration=2,
            return_state=True,
        )
        evaluated = state.result()
    finally:
        stub.stop()
    published = artifacts_of(state.state_details.flow_run_id)
    assert set(published) == {"pmlm-evaluate-summary", REPORT_KEY}
    summary = published["pmlm-evaluate-summary"].data
    assert "## Methods compared" in summary and "| pmlm_initial |" in summary
    assert "pmlm_initial: on " in summary  # the closing sentence
    html = ws / "reports" / "report.html"
    # a link artifact is stored as the Markdown link the UI shows
    assert published[REPORT_KEY].data == f"[Evaluation report (report.html)]({html.as_uri()})"
    page = html.read_text()
    assert '<section class="patient"' in page and evaluated.llm in page

    # stable keys: a second run adds to the same key's history
    export(workspace=str(ws))
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        history = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[MANIFEST_KEY]))
        )
    assert len(history) >= 2
