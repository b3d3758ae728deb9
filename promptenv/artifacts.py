"""What a flow run shows on its Prefect page, as plain Markdown and table rows.

The flows publish these with Prefect's ``create_*_artifact`` under the stable
keys below, so the UI shows each artifact's history across runs:

- ``summary_markdown``: cohort counts, the recommenders' validation table and
  the one selected, the methods table with 95% CIs and `closing_sentence`;
- ``manifest_rows``: the exported prompt table's manifest, one row per field;
- ``report_link``: a ``file://`` link to the HTML report.

Nothing here talks to Prefect: the functions take what the steps returned.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from promptenv.evaluate import markdown_table

#: Prefect's rule for artifact keys: lowercase letters, digits and dashes.
KEY_PATTERN = re.compile(r"^[a-z0-9-]+$")
MANIFEST_KEY = "pmlm-export-manifest"
REPORT_KEY = "pmlm-report"
#: The method a closing sentence speaks of first: the policy's, else the initial prompt.
HEADLINE_METHODS = ("pmlm", "pmlm_initial")


def summary_key(flow_name: str) -> str:
    """The stable key of a flow's summary artifact, e.g. ``pmlm-pipeline-summary``."""
    key = f"{flow_name}-summary".lower().replace("_", "-")
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"{key!r} is not a Prefect artifact key (lowercase letters, digits and dashes)"
        )
    return key


def closing_sentence(table: pd.DataFrame) -> str:
    """One sentence on the evaluation: how much of the general→oracle gap the headline method
    closes on each subset, with its recall and 95% CI."""
    if table.empty:
        return "No method was evaluated."
    present = set(table["method"])
    method = next((m for m in HEADLINE_METHODS if m in present), None)
    if method is None:
        pool = table[~table["method"].isin(["oracle", "general"])]
        pool = pool if len(pool) else table
        method = str(pool.sort_values("recall", ascending=False)["method"].iloc[0])
    parts = []
    for r in table[table["method"] == method].itertuples(index=False):
        gap = "" if pd.isna(r.gap_closed) else f" and closes {r.gap_closed:.0%} of the gap"
        parts.append(
            f"on {r.subset} encounters (n = {r.n}) its plan-item recall is {r.recall:.3f} "
            f"[{r.recall_lo:.3f}, {r.recall_hi:.3f}]{gap}"
        )
    return (
        f"{method}: " + "; ".join(parts) + " between the general prompt (0%) and the oracle (100%)."
    )


def _cohort_lines(summary: Mapping[str, Any]) -> list[str]:
    by_split = summary.get("index_encounters_by_split", {})
    splits = ", ".join(f"{k} {v}" for k, v in by_split.items())
    return [
        "| what | count |",
        "|---|---|",
        f"| patients | {summary.get('patients', '?')} |",
        f"| encounters | {summary.get('encounters', '?')} |",
        f"| events | {summary.get('events', '?')} |",
        f"| index encounters | {summary.get('index_encounters', '?')} ({splits}) |",
        f"| obstetric index encounters | {summary.get('obstetric_index_encounters', '?')} |",
        f"| quarantined records | {summary.get('quarantined', '?')} |",
    ]


def _rows_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(c for r in rows for c in r))

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows),
    ]


def summary_markdown(
    title: str,
    *,
    cohort: Mapping[str, Any] | None = None,
    recommender: str | None = None,
    recommender_rows: Sequence[Mapping[str, Any]] | None = None,
    methods: pd.DataFrame | None = None,
    llm: str | None = None,
    report: Path | None = None,
    notes: Sequence[str] = (),
) -> str:
    """A flow run's summary; sections without input are left out. ``notes``: sentences on
    what the run did (prompts written, the export, the policy's training)."""
    lines = [f"# {title}", ""]
    for note in notes:
        lines += [note, ""]
    if cohort is not None:
        lines += ["## Cohort", "", *_cohort_lines(cohort), ""]
    if recommender is not None or recommender_rows:
        lines += ["## Recommenders", ""]
        if recommender is not None:
            lines += [f"Selected on validation patients: **{recommender}**.", ""]
        if recommender_rows:
            lines += [*_rows_table(recommender_rows), ""]
    if methods is not None:
        lines += ["## Methods compared", ""]
        if llm:
            lines += [f"LLM: {llm}. Means with bootstrap 95% confidence intervals.", ""]
        lines += [markdown_table(methods), "", closing_sentence(methods), ""]
    if report is not None:
        lines += [f"Report: `{report}`", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def manifest_rows(manifest: Mapping[str, Any]) -> list[dict[str, str]]:
    """The export manifest as (field, value) rows: nested fields dotted, columns listed."""
    rows: list[dict[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif prefix == "columns" and isinstance(value, Sequence) and not isinstance(value, str):
            names = [c["name"] if isinstance(c, Mapping) else str(c) for c in value]
            rows.append({"field": "columns", "value": f"{len(names)}: {', '.join(names)}"})
        elif isinstance(value, Sequence) and not isinstance(value, str):
            rows.append({"field": prefix, "value": ", ".join(map(str, value))})
        else:
            rows.append({"field": prefix, "value": "" if value is None else str(value)})

    walk("", manifest)
    return rows


def report_link(path: Path) -> str:
    """The ``file://`` address of a report (opened from the machine that holds the workspace)."""
    return path.resolve().as_uri()


__all__ = [
    "MANIFEST_KEY",
    "REPORT_KEY",
    "closing_sentence",
    "manifest_rows",
    "report_link",
    "summary_key",
    "summary_markdown",
]
