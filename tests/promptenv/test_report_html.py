"""The HTML report: one self-contained page, rendered by headless Chromium in CI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import METHODS, recsys_table, synthetic_evaluation

from promptenv.evaluate import Evaluation
from promptenv.policy_info import PolicyInfo
from promptenv.report_html import HTML_FILE, patient_cases, render_html, write_html_report

PLAN = ["Prenatal visit (regime/therapy)", "Hemoglobin A1c measurement", "Influenza vaccine"]
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def with_prompts(evaluation: Evaluation) -> Evaluation:
    """The synthetic evaluation's rows with what `evaluate_methods` records about each prompt."""
    results = evaluation.results.copy()
    rank = {m: i for i, m in enumerate(METHODS)}

    def provenance(method: str) -> str:
        fragments: list[dict[str, object]] = [
            {"name": "profile", "event_ids": ["ev-preg-1"], "age_years": 31}
        ]
        if method in ("self", "pmlm_initial", "pmlm"):
            fragments.append(
                {
                    "name": "self",
                    "model": "als",
                    "items": [{"item_key": "proc:prenatal", "score": 0.8123, "reasons": []}],
                }
            )
            fragments.append(
                {
                    "name": "peer",
                    "model": "als",
                    "n_peers": 20,
                    "min_support": 2,
                    "items": [{"item_key": "imm:flu", "support": 7, "n_peers": 20}],
                }
            )
        doc: dict[str, object] = {"fragments": fragments}
        if method == "pmlm":
            doc |= {"edits": ["drop:encounters", "k:self+1"], "policy": "pol-1234"}
        return json.dumps(doc)

    results["system"] = [
        "" if m == "general" else f"Patient: 31-year-old woman. <{m}> prompt"
        for m in results["method"]
    ]
    results["question"] = "What should be ordered at her next visit?"
    results["provenance"] = [provenance(m) for m in results["method"]]
    results["answer"] = [f"- prenatal visit\n- answer of {m}" for m in results["method"]]
    results["plan_items"] = json.dumps(PLAN)
    # richer methods cover more of the plan
    results["covered"] = [json.dumps(list(range(min(3, rank[m] // 2)))) for m in results["method"]]
    return Evaluation(results, evaluation.table, evaluation.calibration, evaluation.llm)


def policy_json(**training: object) -> dict[str, object]:
    """A ``policy.json`` with a validation curve (and ``training``'s other keys)."""
    curve = [
        {"timesteps": t, "llm_calls": 10.0 * i, "validation_reward": r}
        for i, (t, r) in enumerate([(64, -0.02), (128, 0.01), (192, 0.04), (256, 0.03)], 1)
    ]
    return {
        "version": "pol-1234",
        "training": {"episodes": 40, "llm_calls": 41, "validation_curve": curve, **training},
    }


def policy_info(**training: object) -> PolicyInfo:
    """The `PolicyInfo` of `policy_json`, as the report gets it."""
    return PolicyInfo.from_json(policy_json(**training))


def test_patient_cases_sample_test_patients_with_every_method(tmp_path: Path) -> None:
    evaluation = with_prompts(synthetic_evaluation())
    cases = patient_cases(evaluation.results, n=3, seed=0)
    assert len(cases) == 3 and len({c.patient_id for c in cases}) == 3
    assert cases == patient_cases(evaluation.results, n=3, seed=0)
    for case in cases:
        assert case.plan_items == tuple(PLAN)
        assert [m.method for m in case.methods] == list(METHODS)
        pmlm = next(m for m in case.methods if m.method == "pmlm")
        assert pmlm.provenance["edits"] == ["drop:encounters", "k:self+1"]
        assert pmlm.covered == frozenset({0})
    with pytest.raises(ValueError, match=r"no column\(s\) \['system'.*run it again"):
        patient_cases(synthetic_evaluation().results)


def test_the_page_holds_everything_inline_and_escapes_the_text(tmp_path: Path) -> None:
    evaluation = with_prompts(synthetic_evaluation())
    path = write_html_report(tmp_path, evaluation, recsys_table(), policy_info(), (7, 3))
    assert path == tmp_path / HTML_FILE
    page = path.read_text()
    assert 'http-equiv="Content-Security-Policy"' in page and "default-src 'none'" in page
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing to fetch
    images = re.findall(r'<img id="([^"]+)"[^>]*src="data:image/png;base64,', page)
    assert images == ["recall-plot", "calls-plot", "recsys-plot", "policy-curve"]
    for r in evaluation.table.itertuples(index=False):
        assert f"{r.recall:.3f} [{r.recall_lo:.3f}, {r.recall_hi:.3f}]" in page
    assert "&lt;pmlm&gt; prompt" in page and "<pmlm>" not in page
    assert "proc:prenatal (score 0.812)" in page and "imm:flu (7 of 20 peers)" in page
    assert "drop:encounters, k:self+1 (policy pol-1234)" in page
    assert page.count('<section class="patient"') == 3
    assert "LLM cache: 7 hits, 3 misses." in page
    # deterministic: the same inputs give the same bytes
    again = write_html_report(tmp_path / "b", evaluation, recsys_table(), policy_info(), (7, 3))
    assert again.read_bytes() == path.read_bytes()


def test_without_prompts_recommenders_or_policy_the_page_says_what_to_run(tmp_path: Path) -> None:
    page = write_html_report(tmp_path, synthetic_evaluation(), None, None).read_text()
    assert "pmlm recsys evaluate" in page and "pmlm policy train" in page
    assert "run it again" in page and '<section class="patient"' not in page
    with pytest.raises(ValueError, match="evaluation table is empty"):
        empty = synthetic_evaluation()
        render_html(Evaluation(empty.results, empty.table.iloc[0:0], {}, "x"), None, None, [])


@pytest.mark.parametrize(
    ("training", "falls_back"),
    [
        ({}, False),
        ({"falls_back_to_start": True}, True),
        ({"falls_back_to_initial": True}, True),  # a policy.json of before the start config
    ],
)
def test_the_policy_section_says_when_the_policy_makes_no_edit(
    tmp_path: Path, training: dict[str, object], falls_back: bool
) -> None:
    page = render_html(synthetic_evaluation(), None, policy_info(**training), [])
    assert "Policy pol-1234: 40 training episodes, 41 LLM calls." in page
    assert ("the policy makes no edit" in page) == falls_back
    assert 'id="policy-curve"' in page


def chromium() -> str:
    """Debian's chromium (.ci/run installs it); CI fails without it, elsewhere the test skips."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "chromium is not installed: `apt-get install chromium` (.ci/run does)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def run_chromium(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="pmlm-chromium-") as profile:
        done = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_chromium_renders_the_tables_the_images_and_the_patient_pages(tmp_path: Path) -> None:
    evaluation = with_prompts(synthetic_evaluation())
    page = write_html_report(tmp_path, evaluation, recsys_table(), policy_info()).read_text()
    # the DOM Chromium built: a probe (in a copy; the report itself runs no script) records
    # each image's decoded size and the rows of each table
    probe = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probe = probe.replace(
        "</body>",
        "<script>window.addEventListener('load', () => {"
        "const imgs = [...document.images].map(i => [i.id, i.naturalWidth, i.naturalHeight]);"
        "const rows = [...document.querySelectorAll('table[id]')].map(t => [t.id, t.rows.length]);"
        "document.body.setAttribute('data-probe', JSON.stringify({imgs, rows}));"
        "});</script></body>",
    )
    probed = tmp_path / "probe.html"
    probed.write_text(probe)
    dom = run_chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri()).stdout
    match = re.search(r"data-probe=\"([^\"]+)\"", dom)
    assert match, dom[:500]
    found = json.loads(match.group(1).replace("&quot;", '"'))
    images = {name: (w, h) for name, w, h in found["imgs"]}
    assert set(images) == {"recall-plot", "calls-plot", "recsys-plot", "policy-curve"}
    assert all(w > 300 and h > 200 for w, h in images.values()), images
    rows = dict(found["rows"])
    assert rows["methods-table"] == len(evaluation.table) + 1  # header + one per row
    assert rows["recsys-table"] == 1 + 8  # the "all" and "obstetric" rows of 4 models
    assert rows["gap-closed"] == 1 + 2 * (len(METHODS) - 2)
    assert sum(name.startswith("provenance-") for name in rows) == 3 * len(METHODS)

    # what a reader sees: a screenshot of the report itself is drawn, not blank
    shot = tmp_path / "shot.png"
    run_chromium("--window-size=1200,2400", f"--screenshot={shot}", (tmp_path / HTML_FILE).as_uri())
    with Image.open(shot) as image:
        assert image.size == (1200, 2400)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    drawn = (pixels < 245).any(axis=1).mean()
    assert drawn > 0.03, drawn  # text, tables and plots, not an empty page
    assert len(np.unique(pixels, axis=0)) > 100  # the plots' colours, not only text
