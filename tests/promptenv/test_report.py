"""The evaluation report: PNG plots and the Markdown that shows them, from a synthetic evaluation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from promptenv.evaluate import EvalSettings, Evaluation, aggregate
from promptenv.report import CALLS_PLOT, RECALL_PLOT, RECSYS_PLOT, write_report

#: method → (mean recall, LLM calls per patient to build its prompt)
METHODS = {
    "general": (0.05, 0),
    "self": (0.25, 0),
    "pmlm_initial": (0.35, 0),
    "pmlm": (0.4, 0),
    "search_4": (0.42, 4),
    "search_16": (0.45, 16),
    "oracle": (0.6, 0),
}


def synthetic_evaluation(seed: int = 0, n: int = 12) -> Evaluation:
    """Per-encounter rows for every method, aggregated by the harness's own `aggregate`."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for method, (recall, calls) in METHODS.items():
            r = float(np.clip(recall + rng.normal(0, 0.1), 0, 1))
            rows.append(
                {
                    "encounter_id": f"e{i}",
                    "patient_id": f"p{i // 2}",
                    "in_obstetric": i % 3 != 0,
                    "in_adult": True,
                    "method": method,
                    "recall": r,
                    "precision": float(rng.uniform(0, 1)),
                    "rouge_l": float(rng.uniform(0, 0.5)),
                    "reward": 0.8 * r + 0.1,
                    "words": int(rng.integers(10, 80)),
                    "prompt_tokens": 0 if method == "general" else int(rng.integers(50, 400)),
                    "llm_calls": calls,
                    "input_tokens": 100,
                    "output_tokens": 50,
                }
            )
    results = pd.DataFrame(rows)
    table = aggregate(results, EvalSettings(bootstrap=200, seed=seed))
    return Evaluation(
        results, table, {"threshold": 0.61, "chosen_on": "4 validation encounters"}, "local:test"
    )


def recsys_table() -> pd.DataFrame:
    rows = []
    for subset in ("all", "obstetric", "adult"):
        for i, model in enumerate(("popularity", "repeat_previous", "als", "blend")):
            rows.append(
                {
                    "subset": subset,
                    "model": model,
                    "n_states": 100,
                    "precision@10": 0.1 + i / 20,
                    "recall@10": 0.4 + i / 20,
                    "ndcg@10": 0.3 + i / 10 + (subset == "obstetric") / 20,
                    "map@10": 0.2,
                    "auc": 0.9,
                }
            )
    return pd.DataFrame(rows)


def assert_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()  # a truncated or corrupt file raises
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = len(np.unique(pixels, axis=0))
    assert width > 300 and height > 200
    assert colours > 20  # not a blank canvas: bars, points, text
    return width, height


def test_report_plots_every_method_with_its_confidence_interval(tmp_path: Path) -> None:
    evaluation = synthetic_evaluation()
    path = write_report(tmp_path, evaluation, recsys_table(), (7, 3))
    assert path == tmp_path / "report.md"
    text = path.read_text()

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images == [RECALL_PLOT, CALLS_PLOT, RECSYS_PLOT]
    for name in images:
        assert_png(tmp_path / name)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(images)
    assert not list(tmp_path.glob("*.tmp"))

    for method in METHODS:
        assert f"| {method} |" in text
    table = evaluation.table
    for r in table.itertuples(index=False):
        assert f"{r.recall:.3f} [{r.recall_lo:.3f}, {r.recall_hi:.3f}]" in text
        assert r.recall_lo < r.recall_hi
    assert set(table["subset"]) == {"obstetric", "adult"}
    search = table[table["method"] == "search_16"]
    assert (search["llm_calls_per_patient"] == 16).all()
    assert "LLM cache: 7 hits, 3 misses." in text and "local:test" in text
    for model in ("popularity", "repeat_previous", "als", "blend"):
        assert f"| {model} |" in text
    assert "ndcg@10" in text


def test_the_same_evaluation_gives_the_same_files(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        write_report(folder, synthetic_evaluation(seed=3), recsys_table(), None)
    for name in ("report.md", RECALL_PLOT, CALLS_PLOT, RECSYS_PLOT):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_without_a_recommender_table_the_report_says_how_to_add_it(tmp_path: Path) -> None:
    write_report(tmp_path, synthetic_evaluation(), recsys_table(), None)
    assert (tmp_path / RECSYS_PLOT).exists()
    text = write_report(tmp_path, synthetic_evaluation(), None, None).read_text()
    assert "pmlm recsys evaluate" in text and RECSYS_PLOT not in text
    assert not (tmp_path / RECSYS_PLOT).exists()  # no stale plot of an earlier run
    assert "LLM cache" not in text


def test_one_subset_and_a_single_method_still_plot(tmp_path: Path) -> None:
    evaluation = synthetic_evaluation()
    table = evaluation.table
    one = table[(table["subset"] == "adult") & (table["method"] == "search_16")]
    path = write_report(tmp_path, Evaluation(evaluation.results, one, {}, "x"), None, None)
    assert "| adult | search_16 |" in path.read_text()
    for name in (RECALL_PLOT, CALLS_PLOT):
        assert_png(tmp_path / name)


def test_bad_inputs_say_what_is_wrong(tmp_path: Path) -> None:
    evaluation = synthetic_evaluation()
    empty = Evaluation(evaluation.results, evaluation.table.iloc[0:0], {}, "x")
    with pytest.raises(ValueError, match="evaluation table is empty"):
        write_report(tmp_path, empty, None, None)
    with pytest.raises(ValueError, match=r"no ndcg@k column.*recsys_comparison\.csv"):
        write_report(tmp_path, evaluation, recsys_table().drop(columns="ndcg@10"), None)
    adult_only = recsys_table()[lambda t: t["subset"] == "adult"]
    with pytest.raises(ValueError, match=r"no rows for subsets \('all', 'obstetric'\)"):
        write_report(tmp_path, evaluation, adult_only, None)
    assert list(tmp_path.iterdir()) == []  # inputs are checked before anything is written


def test_pmlm_evaluate_writes_the_report_with_the_workspaces_recommender_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from pipelines.workspace import Workspace
    from promptenv.llm import CacheStats
    from promptenv.steps import write_evaluation

    ws = Workspace.at(tmp_path)
    ws.reports_dir.mkdir(parents=True)
    recsys_table().to_csv(ws.reports_dir / "recsys_comparison.csv", index=False)
    client = SimpleNamespace(cache_stats=CacheStats(hits=4, misses=9))
    written = write_evaluation(ws, synthetic_evaluation(), client)  # type: ignore[arg-type]
    assert written.table == ws.reports_dir / "evaluation.md"
    assert written.report == ws.reports_dir / "report.md"
    report = (ws.reports_dir / "report.md").read_text()
    assert "LLM cache: 4 hits, 9 misses." in report and "| blend |" in report
    assert (ws.reports_dir / RECSYS_PLOT).exists()
    assert capsys.readouterr().out == ""  # a step writes files, never the console
    # the closing sentence's pmlm − best is the paired table's best − pmlm, sign flipped
    table = written.table.read_text()
    said = re.search(r"best fixed prompt on them \((\w+), \d\.\d+\): (.+?\])", table)
    assert said, table
    best, sentence_ci = said.groups()
    row = re.search(rf"\| obstetric \| recall \| {best} \| \d+ \| \d+ \| \**(.+?)\** \|", table)
    assert row, table
    difference, low, high = re.findall(r"[+-]\d\.\d+", row.group(1))
    flip = str.maketrans("+-", "-+")
    assert (
        sentence_ci
        == f"{difference.translate(flip)} [{high.translate(flip)}, {low.translate(flip)}]"
    )


def test_the_html_report_shows_the_workspaces_saved_policy(tmp_path: Path) -> None:
    """`write_evaluation` reads the workspace's ``policy.json`` (as `PolicyInfo`) for the HTML
    report's policy section: its version, cost, curve and whether it makes no edit."""
    import json
    from types import SimpleNamespace

    from pipelines.workspace import Workspace
    from promptenv.llm import CacheStats
    from promptenv.policy_info import (
        PolicyInfo,
        TrainingSummary,
        ValidationPoint,
        policy_dir,
        policy_info_path,
    )
    from promptenv.steps import write_evaluation

    ws = Workspace.at(tmp_path)
    curve = (ValidationPoint(32.0, 12.0, -0.01), ValidationPoint(64.0, 20.0, -0.02))
    training = TrainingSummary(
        episodes=7, llm_calls=20, validation_curve=curve, falls_back_to_start=True
    )
    path = policy_info_path(policy_dir(ws))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(PolicyInfo(training=training, version="abc123").to_json()))
    client = SimpleNamespace(cache_stats=CacheStats(hits=4, misses=9))
    written = write_evaluation(ws, synthetic_evaluation(), client)  # type: ignore[arg-type]
    page = written.html.read_text()
    assert "Policy abc123: 7 training episodes, 20 LLM calls." in page
    assert "the policy makes no edit" in page and 'id="policy-curve"' in page
