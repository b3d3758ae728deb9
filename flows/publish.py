"""Prefect artifacts of the flow runs: what a run's page in the UI shows besides its logs.

Each flow calls these at its end; the content comes from `promptenv.artifacts`.
Keys are stable, so the UI keeps each artifact's history across runs:

- ``pmlm-<flow>-summary`` (Markdown): the run's summary;
- ``pmlm-export-manifest`` (table): the exported prompt table's manifest;
- ``pmlm-report`` (link): the HTML report (``file://``: open it on the machine
  that holds the workspace).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from promptenv.artifacts import (
    MANIFEST_KEY,
    REPORT_KEY,
    manifest_rows,
    report_link,
    summary_key,
    summary_markdown,
)


def publish_summary(flow_name: str, markdown: str) -> None:
    """The flow run's summary as a Markdown artifact keyed ``<flow_name>-summary``."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=markdown, key=summary_key(flow_name), description=f"Summary of {flow_name}"
    )


def publish_flow_summary(flow_name: str, **content: Any) -> None:
    """`publish_summary` of `summary_markdown(flow_name, **content)`."""
    publish_summary(flow_name, summary_markdown(flow_name, **content))


def publish_manifest(manifest: Path) -> None:
    """The export manifest (``prompts.manifest.json``) as a table artifact."""
    from prefect.artifacts import create_table_artifact

    rows: list[dict[str, Any]] = [dict(r) for r in manifest_rows(json.loads(manifest.read_text()))]
    create_table_artifact(
        table=rows,
        key=MANIFEST_KEY,
        description=f"Manifest of the exported prompt table ({manifest})",
    )


def publish_report_link(report: Path) -> None:
    """A link artifact to the HTML report."""
    from prefect.artifacts import create_link_artifact

    create_link_artifact(
        link=report_link(report),
        link_text=f"Evaluation report ({report.name})",
        key=REPORT_KEY,
        description=f"The HTML evaluation report: {report.resolve()}",
    )


__all__ = ["publish_flow_summary", "publish_manifest", "publish_report_link", "publish_summary"]
