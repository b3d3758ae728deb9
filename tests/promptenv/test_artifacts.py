"""The content of the flows' Prefect artifacts, built from what the steps return."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_report import synthetic_evaluation

from promptenv.artifacts import (
    closing_sentence,
    manifest_rows,
    report_link,
    summary_key,
    summary_markdown,
)

COHORT = {
    "patients": 160,
    "encounters": 4000,
    "events": 90000,
    "index_encounters": 1200,
    "index_encounters_by_split": {"train": 800, "validation": 200, "test": 200},
    "obstetric_index_encounters": 300,
    "quarantined": 3,
}


def test_the_closing_sentence_speaks_of_pmlm_with_its_interval_and_gap() -> None:
    table = synthetic_evaluation().table
    sentence = closing_sentence(table)
    assert sentence.startswith("pmlm: on ")
    for r in table[table["method"] == "pmlm"].itertuples(index=False):
        assert f"{r.recall:.3f} [{r.recall_lo:.3f}, {r.recall_hi:.3f}]" in sentence
        assert f"closes {r.gap_closed:.0%} of the gap" in sentence
    without = table[~table["method"].isin(["pmlm", "pmlm_initial"])]
    best = without[~without["method"].isin(["oracle", "general"])]
    top = best.sort_values("recall", ascending=False)["method"].iloc[0]
    assert closing_sentence(without).startswith(f"{top}: ")
    assert closing_sentence(table.iloc[0:0]) == "No method was evaluated."


def test_the_summary_has_the_cohort_the_recommenders_and_the_methods(tmp_path: Path) -> None:
    evaluation = synthetic_evaluation()
    rows = [{"model": "als", "ndcg@10": 0.41234}, {"model": "popularity", "ndcg@10": 0.2}]
    text = summary_markdown(
        "pmlm-pipeline",
        cohort=COHORT,
        recommender="als",
        recommender_rows=rows,
        methods=evaluation.table,
        llm="local:test",
        report=tmp_path / "report.html",
    )
    assert text.startswith("# pmlm-pipeline\n")
    assert "| patients | 160 |" in text and "(train 800, validation 200, test 200)" in text
    assert "**als**" in text and "| als | 0.4123 |" in text
    assert "| obstetric | pmlm |" in text and closing_sentence(evaluation.table) in text
    assert str(tmp_path / "report.html") in text
    alone = summary_markdown("pmlm-build", cohort=COHORT, notes=["320 prompts written."])
    assert "## Cohort" in alone and "Methods" not in alone and "Recommenders" not in alone
    assert alone.startswith("# pmlm-build\n\n320 prompts written.\n")


def test_manifest_rows_flatten_every_field() -> None:
    manifest = {
        "name": "prompts",
        "rows": 320,
        "columns": [{"name": "encounter_id", "type": "string"}, {"name": "system"}],
        "formats": ["parquet", "jsonl"],
        "files": {"parquet": {"path": "prompts.parquet", "sha256": "ab12", "bytes": 10}},
        "sql": None,
        "recommender": {"model": "als"},
    }
    rows = {r["field"]: r["value"] for r in manifest_rows(manifest)}
    assert rows == {
        "name": "prompts",
        "rows": "320",
        "columns": "2: encounter_id, system",
        "formats": "parquet, jsonl",
        "files.parquet.path": "prompts.parquet",
        "files.parquet.sha256": "ab12",
        "files.parquet.bytes": "10",
        "sql": "",
        "recommender.model": "als",
    }


def test_keys_are_stable_and_valid(tmp_path: Path) -> None:
    assert summary_key("pmlm-pipeline") == "pmlm-pipeline-summary"
    assert summary_key("pmlm_evaluate") == "pmlm-evaluate-summary"
    with pytest.raises(ValueError, match="not a Prefect artifact key"):
        summary_key("pmlm evaluate")
    assert report_link(tmp_path / "r.html") == (tmp_path / "r.html").resolve().as_uri()
