"""The evaluation report as one self-contained HTML page: ``reports/report.html``.

It opens in any browser and can be mailed as one file: the plots are inline PNG
(``data:`` URIs), the style sheet is inline, there is no script and the page's
Content-Security-Policy forbids fetching anything, so nothing leaves the machine
when it is opened. What it shows:

- the methods table (means with bootstrap 95% CIs), the gap closed per method
  as bars, recall per method and quality against LLM calls (the plots of
  `promptenv.report`);
- the recommenders' test metrics and their nDCG plot, when given;
- the policy's validation curve (reward over the initial prompt against the
  LLM calls training spent), when a trained policy's record (`PolicyInfo`) is given;
- a section per sampled test patient (`patient_cases`): her prompt under each
  method with each fragment's provenance (events, peers with their support
  counts, recommender scores, the policy's edits), the LLM's answer, and the
  physician's plan with the items each answer covered marked.

The same inputs give the same bytes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipelines.workspace import atomic_write_bytes
from promptenv.evaluate import Evaluation, gap_note
from promptenv.policy_info import PolicyInfo, ValidationPoint
from promptenv.report import (
    calls_figure,
    ndcg_column,
    png_bytes,
    recall_figure,
    recsys_figure,
    recsys_rows,
)

HTML_FILE = "report.html"
#: Columns of the evaluation's rows that the patient sections read.
CASE_COLUMNS = ("system", "question", "provenance", "answer", "plan_items", "covered")
#: No fetch of any kind, no script: inline images and style only.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1, h2, h3 { line-height: 1.2; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1.5em; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.6em; border: 1px solid #e4e4e4; }
.bar { background: #4c78a8; height: 0.9em; display: inline-block; vertical-align: middle; }
.covered { color: #11703b; font-weight: bold; }
.missed { color: #999; }
section.patient { page-break-before: always; border-top: 3px solid #4c78a8; margin-top: 2em; }
nav li { margin: 0.15em 0; }
"""


def _h(value: object) -> str:
    return escape(str(value), quote=True)


def _img(fig: Figure, alt: str, name: str) -> str:
    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<img id="{name}" alt="{_h(alt)}" src="data:image/png;base64,{data}">'


def _table(
    header: Sequence[str], rows: Sequence[Sequence[object]], table_id: str, numeric: set[int]
) -> str:
    head = "".join(f"<th>{_h(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_h(c)}</td>' if i in numeric else f"<td>{_h(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _ci(row: Mapping[str, Any], metric: str) -> str:
    return f"{row[metric]:.3f} [{row[metric + '_lo']:.3f}, {row[metric + '_hi']:.3f}]"


def methods_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the methods table: means with [95% CI], gap closed, calls."""
    header = [
        "subset",
        "method",
        "n",
        "plan-item recall",
        "precision",
        "ROUGE-L F1",
        "reward",
        "words",
        "gap closed",
        "prompt tokens",
        "LLM calls/patient",
    ]
    rows = []
    for r in table.to_dict(orient="records"):
        gap = "" if pd.isna(r["gap_closed"]) else f"{r['gap_closed']:.2f}"
        rows.append(
            [
                str(r["subset"]),
                str(r["method"]),
                str(r["n"]),
                _ci(r, "recall"),
                _ci(r, "precision"),
                _ci(r, "rouge_l"),
                _ci(r, "reward"),
                f"{r['words']:.0f}",
                gap,
                f"{r['prompt_tokens']:.0f}",
                f"{r['llm_calls_per_patient']:.0f}",
            ]
        )
    return header, rows


def _gap_bars(table: pd.DataFrame) -> str:
    """Gap closed per method and subset as CSS bars (no image, no script)."""
    rows = []
    for r in table.to_dict(orient="records"):
        if r["method"] in ("general", "oracle"):
            continue
        gap = r["gap_closed"]
        if pd.isna(gap):
            bar, text = "", "n/a"
        else:
            width = float(np.clip(gap, 0.0, 1.0)) * 12
            bar, text = f'<span class="bar" style="width:{width:.2f}em"></span> ', f"{gap:.0%}"
        rows.append(
            f"<tr><td>{_h(r['subset'])}</td><td>{_h(r['method'])}</td>"
            f'<td class="num">{bar}{_h(text)}</td></tr>'
        )
    return (
        '<table id="gap-closed"><thead><tr><th>subset</th><th>method</th>'
        f"<th>gap closed</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def recsys_table_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a recommender comparison (floats to 3 decimals)."""
    header = [str(c) for c in table.columns]
    rows = [
        [f"{v:.3f}" if isinstance(v, float) else str(v) for v in record]
        for record in table.itertuples(index=False)
    ]
    return header, rows


def policy_curve_figure(curve: Sequence[ValidationPoint]) -> Figure:
    """Validation reward over the initial prompt against the LLM calls training had spent."""
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.subplots()
    calls = [p.llm_calls for p in curve]
    rewards = [p.validation_reward for p in curve]
    ax.plot(calls, rewards, marker="o", color="#4c78a8")
    best = int(np.argmax(rewards))
    ax.plot([calls[best]], [rewards[best]], marker="*", markersize=14, color="#e45756", ls="")
    for p in curve:
        ax.annotate(
            f"{p.timesteps:.0f} steps",
            (p.llm_calls, p.validation_reward),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=8,
        )
    ax.axhline(0.0, color="#888", lw=1, ls="--")
    ax.set_xlabel("LLM calls spent in training")
    ax.set_ylabel("validation reward over the start prompt")
    ax.grid(alpha=0.3)
    return fig


@dataclass(frozen=True)
class MethodCase:
    """One method's prompt for one encounter, the LLM's answer and what it covered."""

    method: str
    system: str
    question: str
    provenance: Mapping[str, Any]
    answer: str
    covered: frozenset[int]
    recall: float


@dataclass(frozen=True)
class PatientCase:
    """One sampled test patient's encounter: her physician's plan and every method's prompt."""

    patient_id: str
    encounter_id: str
    plan_items: tuple[str, ...]
    methods: tuple[MethodCase, ...]


def _json(value: object) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def patient_cases(results: pd.DataFrame, n: int = 3, seed: int = 0) -> list[PatientCase]:
    """``n`` test patients drawn with ``seed`` from the evaluation's rows, one encounter each.

    The rows must carry `CASE_COLUMNS` (`evaluate_methods` writes them);
    ValueError names the missing ones.
    """
    missing = [c for c in CASE_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(
            f"the evaluation rows have no column(s) {missing}: they come from an older "
            "`pmlm evaluate`; run it again to get the per-patient pages"
        )
    patients = sorted(set(results["patient_id"]))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(patients, size=min(n, len(patients)), replace=False))
    cases = []
    for pid in chosen:
        rows = results[results["patient_id"] == pid]
        eid = sorted(set(rows["encounter_id"]))[0]
        rows = rows[rows["encounter_id"] == eid]
        methods = tuple(
            MethodCase(
                str(r["method"]),
                str(r["system"]),
                str(r["question"]),
                _json(r["provenance"]) or {},
                str(r["answer"]),
                frozenset(int(i) for i in _json(r["covered"])),
                float(r["recall"]),
            )
            for r in rows.to_dict(orient="records")
        )
        items = tuple(str(i) for i in _json(rows.iloc[0]["plan_items"]))
        cases.append(PatientCase(str(pid), str(eid), items, methods))
    return cases


def _fragment_rows(provenance: Mapping[str, Any]) -> list[list[str]]:
    """(fragment, where its text came from) for every fragment of a prompt."""
    rows = []
    for frag in provenance.get("fragments", []):
        name = str(frag.get("name", "?"))
        parts = []
        if frag.get("event_ids"):
            parts.append(f"events: {', '.join(map(str, frag['event_ids']))}")
        if frag.get("encounter_ids"):
            parts.append(f"encounters: {', '.join(map(str, frag['encounter_ids']))}")
        if name == "self":
            scores = "; ".join(
                f"{i['item_key']} (score {i['score']:.3f})" for i in frag.get("items", [])
            )
            parts.append(f"recommender {frag.get('model', '')}: {scores}")
        if name == "peer":
            support = "; ".join(
                f"{i['item_key']} ({i['support']} of {i['n_peers']} peers)"
                for i in frag.get("items", [])
            )
            parts.append(
                f"{frag.get('n_peers', 0)} similar patients (min support "
                f"{frag.get('min_support', 0)}): {support}"
            )
        extra = {
            k: v
            for k, v in frag.items()
            if k not in ("name", "event_ids", "encounter_ids", "items", "model", "n_peers")
            and k != "min_support"
        }
        if extra:
            parts.append(", ".join(f"{k}: {v}" for k, v in extra.items()))
        rows.append([name, "; ".join(parts) or "fixed text"])
    if "edits" in provenance:
        edits = ", ".join(map(str, provenance["edits"])) or "none (the initial prompt)"
        policy = f" (policy {provenance['policy']})" if provenance.get("policy") else ""
        rows.append(["edits", f"{edits}{policy}"])
    return rows


def _patient_section(number: int, case: PatientCase) -> str:
    methods = [m.method for m in case.methods]
    plan_rows = []
    for i, item in enumerate(case.plan_items):
        marks = "".join(
            '<td class="covered">✓</td>' if i in m.covered else '<td class="missed">·</td>'
            for m in case.methods
        )
        plan_rows.append(f"<tr><td>{_h(item)}</td>{marks}</tr>")
    recall = "".join(f'<td class="num">{m.recall:.2f}</td>' for m in case.methods)
    head = "".join(f"<th>{_h(m)}</th>" for m in methods)
    parts = [
        f'<section class="patient" id="patient-{number}">',
        f"<h2>Patient {number}: {_h(case.patient_id)}, encounter {_h(case.encounter_id)}</h2>",
        "<h3>The physician's plan at the next visit</h3>",
        "<p>✓: the method's answer covers the item (matching threshold of the evaluation).</p>",
        f'<table class="plan"><thead><tr><th>plan item</th>{head}</tr></thead><tbody>'
        f"{''.join(plan_rows)}<tr><th>recall</th>{recall}</tr></tbody></table>",
    ]
    for m in case.methods:
        parts += [
            f'<h3 class="method">{_h(m.method)}</h3>',
            "<p>Prompt (system):</p>",
            f'<pre class="prompt">{_h(m.system) or "(no prompt: the question alone)"}</pre>',
            f"<p>Question: {_h(m.question)}</p>",
            _table(
                ["fragment", "provenance"],
                _fragment_rows(m.provenance),
                f"provenance-{number}-{m.method}",
                set(),
            ),
            "<p>The LLM's answer:</p>",
            f'<pre class="answer">{_h(m.answer)}</pre>',
        ]
    parts.append("</section>")
    return "\n".join(parts)


def render_html(
    evaluation: Evaluation,
    recsys_table: pd.DataFrame | None,
    policy_info: PolicyInfo | None,
    cases: Sequence[PatientCase],
    cache_stats: tuple[int, int] | None = None,
) -> str:
    """The report page (see the module docstring). ValueError when the evaluation is empty."""
    table = evaluation.table
    if table.empty:
        raise ValueError("the evaluation table is empty: there is nothing to report")
    calibration = evaluation.calibration
    header, rows = methods_rows(table)
    cache = f" LLM cache: {cache_stats[0]} hits, {cache_stats[1]} misses." if cache_stats else ""
    body = [
        "<h1>PMLM evaluation report</h1>",
        f"<p>LLM: {_h(evaluation.llm)}. Matching threshold {_h(calibration.get('threshold'))} "
        f"({_h(calibration.get('chosen_on', 'not recorded'))}).{_h(cache)}</p>",
        "<nav><ul>"
        + "".join(
            f'<li><a href="#{a}">{_h(t)}</a></li>'
            for a, t in (
                ("methods", "Methods compared"),
                ("gap", "Gap closed"),
                ("calls", "Quality against LLM calls"),
                ("recommenders", "Recommenders"),
                ("policy", "Policy training"),
            )
        )
        + "".join(
            f'<li><a href="#patient-{i}">Patient {i}: {_h(c.patient_id)}</a></li>'
            for i, c in enumerate(cases, 1)
        )
        + "</ul></nav>",
        '<h2 id="methods">Methods compared</h2>',
        "<p>Means over the same test encounters with bootstrap 95% confidence intervals "
        "[low, high]; LLM calls/patient = calls spent to build one prompt.</p>",
        _table(header, rows, "methods-table", {2, 7, 8, 9, 10}),
        _img(recall_figure(table), "Plan-item recall per method with 95% CIs", "recall-plot"),
        '<h2 id="gap">Gap closed</h2>',
        "<p>(method − general) / (oracle − general) on plan-item recall: 0% is the general "
        f"prompt, 100% the oracle that is told the plan. {_h(gap_note(table))}</p>",
        _gap_bars(table),
        '<h2 id="calls">Quality against LLM calls per patient</h2>',
        _img(calls_figure(table), "Recall and reward against LLM calls", "calls-plot"),
        '<h2 id="recommenders">Recommenders</h2>',
    ]
    if recsys_table is None:
        body.append("<p>No recommender comparison: run <code>pmlm recsys evaluate</code>.</p>")
    else:
        ndcg_column(recsys_table)
        shown = recsys_rows(recsys_table)
        fig, column = recsys_figure(recsys_table)
        r_header, r_rows = recsys_table_rows(shown)
        body += [
            _table(r_header, r_rows, "recsys-table", set(range(2, len(r_header)))),
            _img(fig, f"{column} per recommender and subset", "recsys-plot"),
        ]
    body.append('<h2 id="policy">Policy training</h2>')
    if policy_info is None or not policy_info.training.validation_curve:
        body.append(
            "<p>No trained policy with a validation curve: run <code>pmlm policy train</code>.</p>"
        )
    else:
        training = policy_info.training
        fallback = (
            f" No checkpoint beat the start prompt ({escape(policy_info.start.method)}) on "
            "validation: the policy makes no edit."
            if training.falls_back_to_start
            else ""
        )
        body += [
            f"<p>Policy {_h(policy_info.version)}: "
            f"{_h(training.episodes)} training episodes, "
            f"{_h(training.llm_calls)} LLM calls.{_h(fallback)}</p>",
            _img(
                policy_curve_figure(training.validation_curve),
                "Policy validation curve",
                "policy-curve",
            ),
        ]
    body += [_patient_section(i, c) for i, c in enumerate(cases, 1)]
    if not cases:
        body.append(
            "<p>No patient pages: these evaluation rows carry no prompts (an older "
            "<code>pmlm evaluate</code>); run it again.</p>"
        )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        "<title>PMLM evaluation report</title>"
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_html_report(
    reports_dir: Path,
    evaluation: Evaluation,
    recsys_table: pd.DataFrame | None,
    policy_info: PolicyInfo | None,
    cache_stats: tuple[int, int] | None = None,
    n_patients: int = 3,
) -> Path:
    """Write ``report.html`` into ``reports_dir`` (atomically); returns its path.

    The patient sections need the evaluation rows' `CASE_COLUMNS`; rows of an
    older evaluation lack them, and the page then says how to get them.
    """
    results = evaluation.results
    with_cases = all(c in results.columns for c in CASE_COLUMNS)
    cases = patient_cases(results, n_patients) if with_cases else []
    page = render_html(evaluation, recsys_table, policy_info, cases, cache_stats)
    path = reports_dir / HTML_FILE
    reports_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, page.encode())
    return path


__all__ = [
    "HTML_FILE",
    "PatientCase",
    "patient_cases",
    "render_html",
    "write_html_report",
]
