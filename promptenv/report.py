"""The evaluation report: ``reports/report.md`` with PNG plots, from an `Evaluation`.

What it shows:

- the methods table (means with bootstrap 95% CIs, gap closed, LLM calls);
- ``report_recall.png``: plan-item recall per method with its 95% CI, one
  panel per subset (obstetric, adult);
- ``report_quality_vs_calls.png``: recall and reward against the LLM calls a
  method spends per patient to build its prompt (0 for a prompt built without
  the LLM, N for a per-patient search over N candidate prompts), on a symmetric
  log axis so that 0 and any N fit;
- the recommenders' test metrics (the table `pmlm recsys evaluate` writes to
  ``reports/recsys_comparison.csv``) and ``report_recsys_ndcg.png``, nDCG@k per
  model and subset, when that table is given.

Plots are drawn on matplotlib's Agg canvas (no display, no pyplot state) and
written atomically under fixed names; the same evaluation gives the same files.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipelines.workspace import atomic_write_bytes
from promptenv.evaluate import SUBSETS, Evaluation, gap_note, markdown_table

REPORT_FILE = "report.md"
RECALL_PLOT = "report_recall.png"
CALLS_PLOT = "report_quality_vs_calls.png"
RECSYS_PLOT = "report_recsys_ndcg.png"
#: Subsets of the recommender comparison that are plotted.
RECSYS_SUBSETS = ("all", "obstetric")
NDCG_COLUMN = re.compile(r"ndcg@(\d+)")
DPI = 110


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (same figure, same bytes)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _save(fig: Figure, path: Path) -> None:
    atomic_write_bytes(path, png_bytes(fig))


def _subsets(table: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(table["subset"]))
    return [s for s in SUBSETS if s in present] + [s for s in present if s not in SUBSETS]


def _methods(table: pd.DataFrame) -> list[str]:
    """Methods in the table's order (`aggregate` sorts them)."""
    return list(dict.fromkeys(table["method"]))


def _errors(frame: pd.DataFrame, metric: str) -> np.ndarray:
    """(2, n) distances from the mean to the CI bounds (0 where a bound is missing)."""
    mean = frame[metric].to_numpy(dtype=float)
    lo = mean - frame[f"{metric}_lo"].to_numpy(dtype=float)
    hi = frame[f"{metric}_hi"].to_numpy(dtype=float) - mean
    # the bootstrap mean of equal values can differ from their mean in the last bit
    return np.clip(np.nan_to_num(np.vstack([lo, hi])), 0.0, None)


def _colours(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def recall_plot(table: pd.DataFrame, path: Path) -> None:
    """Plan-item recall per method with 95% CI error bars, one panel per subset."""
    _save(recall_figure(table), path)


def recall_figure(table: pd.DataFrame) -> Figure:
    """The figure of `recall_plot`."""
    subsets, methods = _subsets(table), _methods(table)
    fig = Figure(figsize=(4.6 * len(subsets), 0.45 * len(methods) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(subsets), squeeze=False, sharey=True)[0]
    positions = {m: i for i, m in enumerate(methods)}
    colours = _colours(methods)
    for ax, subset in zip(axes, subsets, strict=True):
        sub = table[table["subset"] == subset]
        y = [positions[m] for m in sub["method"]]
        ax.barh(
            y,
            sub["recall"].fillna(0.0),
            xerr=_errors(sub, "recall"),
            color=[colours[m] for m in sub["method"]],
            capsize=3,
            error_kw={"elinewidth": 1},
        )
        n = int(sub["n"].max()) if len(sub) else 0
        ax.set_title(f"{subset} (n = {n} encounters)")
        ax.set_xlabel("plan-item recall (mean, 95% CI)")
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(methods)), methods)
    axes[0].invert_yaxis()
    return fig


def calls_plot(table: pd.DataFrame, path: Path) -> None:
    """Recall and reward (95% CI) against LLM calls per patient; rows = metric, columns = subset."""
    _save(calls_figure(table), path)


def calls_figure(table: pd.DataFrame) -> Figure:
    """The figure of `calls_plot`."""
    subsets, methods = _subsets(table), _methods(table)
    colours = _colours(methods)
    calls = table["llm_calls_per_patient"].fillna(0.0).astype(float)
    ticks = sorted({0.0, 1.0, *calls})
    right = max(ticks) * 1.6 + 1
    fig = Figure(figsize=(4.4 * len(subsets) + 1.8, 6.4), layout="constrained")
    axes = fig.subplots(2, len(subsets), squeeze=False, sharex=True)
    for col, subset in enumerate(subsets):
        sub = table[table["subset"] == subset].assign(calls=calls)
        for row, (metric, label) in enumerate(
            (("recall", "plan-item recall"), ("reward", "reward"))
        ):
            ax = axes[row][col]
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(-0.5, right)
            # methods with the same number of calls sit side by side: spread them in
            # the axis's own (symmetric log) coordinates, so any number of calls works
            scale = ax.xaxis.get_transform()
            width = float(np.diff(scale.transform(np.array([-0.5, right])))[0])
            rank = sub.groupby("calls").cumcount().to_numpy()
            count = sub.groupby("calls")["method"].transform("size").to_numpy()
            shifted = scale.transform(sub["calls"].to_numpy()) + (rank - (count - 1) / 2) * (
                0.035 * width
            )
            x = scale.inverted().transform(shifted)
            errors = _errors(sub, metric)
            for i, r in enumerate(sub.itertuples(index=False)):
                ax.errorbar(
                    [x[i]],
                    [getattr(r, metric)],
                    yerr=errors[:, [i]],
                    fmt="o",
                    color=colours[r.method],
                    capsize=3,
                    label=r.method,
                )
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"{label} (mean, 95% CI)")
            if row == 0:
                ax.set_title(subset)
            else:
                ax.set_xlabel("LLM calls per patient to build the prompt")
    handles: dict[str, Artist] = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    fig.legend(
        [handles[m] for m in methods if m in handles],
        [m for m in methods if m in handles],
        loc="outside right center",
        title="method",
    )
    return fig


def ndcg_column(table: pd.DataFrame) -> str:
    """The nDCG@k column of a recommender comparison (nDCG@10 when present)."""
    found = sorted(
        (c for c in table.columns if NDCG_COLUMN.fullmatch(str(c))),
        key=lambda c: (c != "ndcg@10", c),
    )
    if not found:
        raise ValueError(
            f"the recommender table has no ndcg@k column (columns: {list(table.columns)}); "
            "pass the table `pmlm recsys evaluate` writes to reports/recsys_comparison.csv"
        )
    return str(found[0])


def recsys_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the `RECSYS_SUBSETS` (ValueError when there are none)."""
    shown = table[table["subset"].isin(RECSYS_SUBSETS)]
    if shown.empty:
        raise ValueError(
            f"the recommender table has no rows for subsets {RECSYS_SUBSETS} "
            f"(it has {sorted(set(table['subset']))})"
        )
    return shown


def recsys_plot(table: pd.DataFrame, path: Path) -> str:
    """Grouped bars of nDCG@k per model for the `RECSYS_SUBSETS`; returns the column plotted."""
    fig, column = recsys_figure(table)
    _save(fig, path)
    return column


def recsys_figure(table: pd.DataFrame) -> tuple[Figure, str]:
    """The figure of `recsys_plot` and the nDCG column it shows."""
    column = ndcg_column(table)
    shown = recsys_rows(table)
    models = list(dict.fromkeys(shown["model"]))
    subsets = [s for s in RECSYS_SUBSETS if s in set(shown["subset"])]
    width = 0.8 / len(subsets)
    fig = Figure(figsize=(max(5.0, 0.9 * len(models) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(models))
    for i, subset in enumerate(subsets):
        values = shown[shown["subset"] == subset].set_index("model")[column]
        ax.bar(
            x + (i - (len(subsets) - 1) / 2) * width,
            [float(values.get(m, np.nan)) for m in models],
            width,
            label=subset,
        )
    ax.set_xticks(x, models, rotation=30, ha="right")
    ax.set_ylabel(f"{column} on test patients")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="subset")
    return fig, column


def _image(alt: str, name: str) -> str:
    return f"![{alt}]({name})"


def write_report(
    reports_dir: Path,
    evaluation: Evaluation,
    recsys_table: pd.DataFrame | None,
    cache_stats: tuple[int, int] | None,
) -> Path:
    """Write ``report.md`` and its PNG plots into ``reports_dir``; returns the Markdown path.

    Args:
        evaluation: what `evaluate_methods` returned (its ``table`` is plotted).
        recsys_table: the recommender comparison (`recsys.steps.evaluate_models`), or None.
        cache_stats: (hits, misses) of the LLM cache during the evaluation, or None.

    Raises ValueError when the evaluation table is empty.
    """
    from recsys.evaluate import to_markdown

    table = evaluation.table
    if table.empty:
        raise ValueError("the evaluation table is empty: there is nothing to report")
    if recsys_table is not None:  # checked before anything is written
        ndcg_column(recsys_table)
        recsys_rows(recsys_table)
    reports_dir.mkdir(parents=True, exist_ok=True)
    recall_plot(table, reports_dir / RECALL_PLOT)
    calls_plot(table, reports_dir / CALLS_PLOT)
    calibration = evaluation.calibration
    lines = [
        "# Evaluation report",
        "",
        f"LLM: {evaluation.llm}. Matching threshold {calibration.get('threshold')} "
        f"({calibration.get('chosen_on', 'not recorded')}).",
    ]
    if cache_stats is not None:
        lines.append(f"LLM cache: {cache_stats[0]} hits, {cache_stats[1]} misses.")
    lines += [
        "",
        "## Methods compared",
        "",
        "Means over the same test encounters with bootstrap 95% confidence intervals "
        "[low, high]; gap closed = (method − general) / (oracle − general) on plan-item recall; "
        "LLM calls/patient = calls spent to build one prompt (one more call answers it). "
        + gap_note(table),
        "",
        markdown_table(table),
        "",
        "## Plan-item recall per method",
        "",
        _image("Plan-item recall per method with 95% confidence intervals", RECALL_PLOT),
        "",
        "## Quality against LLM calls per patient",
        "",
        "Methods that build the prompt without the LLM sit at 0; a per-patient search "
        "over N candidate prompts spends N calls per patient (symmetric log axis).",
        "",
        _image("Recall and reward against LLM calls per patient", CALLS_PLOT),
        "",
        "## Recommenders",
        "",
    ]
    if recsys_table is None:
        (reports_dir / RECSYS_PLOT).unlink(missing_ok=True)  # a plot of an earlier run
        lines.append(
            "No recommender comparison in this workspace: run `pmlm recsys evaluate` to add it."
        )
    else:
        column = recsys_plot(recsys_table, reports_dir / RECSYS_PLOT)
        lines += [
            "Every saved recommender on test patients (ranking of next-plan items).",
            "",
            to_markdown(recsys_table).rstrip("\n"),
            "",
            _image(f"{column} per recommender and subset", RECSYS_PLOT),
        ]
    path = reports_dir / REPORT_FILE
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


__all__ = ["CALLS_PLOT", "RECALL_PLOT", "RECSYS_PLOT", "REPORT_FILE", "write_report"]
