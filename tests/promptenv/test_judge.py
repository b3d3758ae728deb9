"""The optional LLM-as-judge score: rubric parsing, what the judge is sent, caching, NaN for a
broken rubric, refusal of a local judge, and the judge column of the evaluation harness.

The judge talks to the loopback stub server (OpenAI-compatible); its replies are
scripted by replacing the stub's answer function for the test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import llm_stub_server
import numpy as np
import pandas as pd
import pytest
from echo_llm import EchoBackend, history_signals
from llm_stub_server import StubLLMServer
from typer.testing import CliRunner

from promptenv.evaluate import EvalSettings, evaluate_methods, markdown_table
from promptenv.judge import (
    JUDGE_SYSTEM,
    RUBRIC,
    PlanJudge,
    judge_messages,
    parse_rating,
)
from promptenv.llm import BackendConfigError, ClientConfig, LLMClient

ITEMS = [
    "routine antenatal care (regime/therapy)",
    "urine screening test for diabetes (procedure)",
    "influenza, seasonal, injectable, preservative free",
]
ANSWER = "- Continue routine antenatal care.\n- Screen the urine for glucose."


@pytest.fixture
def judge_replies(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[str], str]], None]:
    """Script the stub's normal answer: ``judge_replies(lambda user_text: reply)``."""

    def script(reply: Callable[[str], str]) -> None:
        monkeypatch.setattr(llm_stub_server, "answer_for", reply)

    return script


def judge_client(stub: StubLLMServer, workspace: Path) -> LLMClient:
    return LLMClient(
        f"openai:judge-model@{stub.url}/v1",
        workspace=workspace,
        config=ClientConfig(openai_api_key="k"),
    )


def sent_messages(stub: StubLLMServer) -> Iterator[list[dict[str, str]]]:
    for request in stub.requests:
        yield request.json["messages"]


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("SCORE: 7", 7),
        ("score: 10", 10),
        ("SCORE: 0", 0),
        ("**SCORE: 4**", 4),
        ("SCORE: 8/10", 8),
        ("The answer covers two of three items.\nSCORE: 6", 6),
        ("  SCORE:3.  ", 3),
        ("", None),
        ("7", None),
        ("SCORE: 11", None),
        ("SCORE: 7.5", None),
        ("SCORE: -1", None),
        ("SCORE: seven", None),
        ("SCORE: 6 because two items are missing", None),
        ("SCORE: 3\nSCORE: 5", None),
        ("I would give it a score of 7.", None),
    ],
)
def test_a_rating_is_read_only_from_one_score_line(reply: str, rating: int | None) -> None:
    assert parse_rating(reply) == rating


def test_the_judge_is_sent_the_fixed_rubric_the_items_and_the_answer_only(
    stub: StubLLMServer,
    workspace: Path,
    judge_replies: Callable[[Callable[[str], str]], None],
) -> None:
    judge_replies(lambda _user: "SCORE: 7")
    verdict = PlanJudge(judge_client(stub, workspace)).judge(ITEMS, ANSWER)
    assert (verdict.score, verdict.rating, verdict.status) == (0.7, 7, "ok")
    (request,) = stub.requests
    body = request.json
    assert body["temperature"] == 0
    # the whole prompt, written out: the instructions, the items (without semantic tags), the answer
    assert body["messages"] == [
        {"role": "system", "content": JUDGE_SYSTEM},
        {
            "role": "user",
            "content": "Plan the physician ordered for the next visit:\n"
            "- routine antenatal care\n"
            "- urine screening test for diabetes\n"
            "- influenza, seasonal, injectable, preservative free\n\n"
            f"Answer to grade:\n<<<\n{ANSWER}\n>>>\n\n{RUBRIC}",
        },
    ]
    assert (JUDGE_SYSTEM, body["messages"][1]["content"]) == judge_messages(ITEMS, ANSWER)


def test_judging_the_same_answer_again_is_a_cache_hit(
    stub: StubLLMServer,
    workspace: Path,
    judge_replies: Callable[[Callable[[str], str]], None],
) -> None:
    judge_replies(lambda _user: "SCORE: 9")
    first = PlanJudge(judge_client(stub, workspace)).judge(ITEMS, ANSWER)
    again = PlanJudge(judge_client(stub, workspace)).judge(ITEMS, ANSWER)  # a new run, same cache
    assert (first.cached, again.cached) == (False, True)
    assert first.score == again.score == 0.9
    assert len(stub.requests) == 1
    PlanJudge(judge_client(stub, workspace)).judge(ITEMS, ANSWER + " Offer the flu shot.")
    assert len(stub.requests) == 2


def test_a_broken_rubric_gives_nan_and_is_counted(
    stub: StubLLMServer,
    workspace: Path,
    judge_replies: Callable[[Callable[[str], str]], None],
) -> None:
    judge_replies(lambda user: "SCORE: 5" if "flu shot" in user else "Looks reasonable to me.")
    judge = PlanJudge(judge_client(stub, workspace))
    verdicts = judge.judge_many(
        [ITEMS, ITEMS, [], ITEMS], [ANSWER, "Offer the flu shot.", ANSWER, "Rest."]
    )
    assert [v.status for v in verdicts] == ["unparsed", "ok", "no_reference", "unparsed"]
    assert math.isnan(verdicts[0].score) and math.isnan(verdicts[2].score)
    assert verdicts[0].reply == "Looks reasonable to me." and verdicts[0].rating is None
    assert verdicts[1].score == 0.5
    stats = judge.stats
    assert (stats.judged, stats.unparsed, stats.no_reference) == (3, 2, 1)
    assert len(stub.requests) == 3  # nothing is asked without plan items


def test_a_local_judge_needs_the_explicit_flag(workspace: Path) -> None:
    local = LLMClient("local", workspace=workspace)
    with pytest.raises(BackendConfigError, match="not a credible judge"):
        PlanJudge(local)
    assert PlanJudge(local, allow_local=True).label == local.label
    echo = LLMClient(EchoBackend(), workspace=workspace)
    with pytest.raises(BackendConfigError, match="allow_local=True"):
        PlanJudge(echo)


def test_pmlm_evaluate_refuses_a_local_judge_before_any_call(tmp_path: Path) -> None:
    from flows.cli import app

    result = CliRunner().invoke(
        app, ["evaluate", "-w", str(tmp_path), "--methods", "general", "--judge", "local"]
    )
    assert result.exit_code == 2, result.output
    assert "not a credible judge" in result.output and "--allow-local-judge" in result.output


def test_the_harness_adds_a_judge_column_only_with_a_judge(
    default_tables: dict[str, pd.DataFrame],
    stub: StubLLMServer,
    tmp_path: Path,
    judge_replies: Callable[[Callable[[str], str]], None],
) -> None:
    tables = default_tables
    # the echo LLM answers the general prompt (no patient text) with one stock line
    judge_replies(lambda user: "no idea" if "Routine follow-up visit." in user else "SCORE: 7")
    settings = EvalSettings(n_obstetric=3, n_adult=2, n_calibration=2, bootstrap=50)
    methods = ["general", "oracle"]
    answers = LLMClient(EchoBackend(), workspace=tmp_path)
    plain = evaluate_methods(answers, tables, history_signals(tables), methods, settings)  # type: ignore[arg-type]
    assert plain.results["judge"].isna().all()
    assert not any(c.startswith("judge") for c in plain.table.columns)
    assert "judge" not in markdown_table(plain.table)
    assert len(stub.requests) == 0

    judge = PlanJudge(judge_client(stub, tmp_path))
    graded = evaluate_methods(
        answers,
        tables,
        history_signals(tables),  # type: ignore[arg-type]
        methods,
        settings,
        judge=judge,
    )
    # the judge adds its columns and changes nothing else
    unjudged = ["judge", "cached"]
    pd.testing.assert_frame_equal(
        graded.results.drop(columns=unjudged), plain.results.drop(columns=unjudged)
    )
    pd.testing.assert_frame_equal(
        graded.table.drop(columns=["judge", "judge_lo", "judge_hi", "judge_n"]), plain.table
    )
    results = graded.results
    oracle, general = (
        results[results["method"] == "oracle"],
        results[results["method"] == "general"],
    )
    assert (oracle["judge"] == 0.7).all() and general["judge"].isna().all()
    table = graded.table.set_index(["subset", "method"])
    assert np.allclose(table.loc[(slice(None), "oracle"), "judge"], 0.7)
    assert (table.loc[(slice(None), "general"), "judge_n"] == 0).all()
    assert table["judge"].isna().sum() == len(table) // 2
    assert judge.stats.judged == len(results) and judge.stats.unparsed == len(general)
    text = markdown_table(graded.table)
    header, rule, *rows = text.splitlines()
    assert header.endswith(" judge (0-1) |") and rule.count("---") == 12
    assert all(r.endswith(" |") and r.count("|") == header.count("|") for r in rows)
    assert any("0.700 [0.700, 0.700]" in r for r in rows)
    assert any(f"none (0 of {n})" in r for r, n in zip(rows, graded.table["n"], strict=True))

    # no identifier of the evaluated encounters reached the judge
    identifiers = set(results["patient_id"]) | set(results["encounter_id"])
    index = tables["index_encounters"].set_index("encounter_id")
    identifiers |= set(index.loc[list(results["encounter_id"].unique()), "next_encounter_id"])
    patients = tables["patients"].set_index("patient_id")
    births = patients.loc[list(identifiers & set(patients.index)), "birth_date"]
    identifiers |= {str(pd.Timestamp(d).date()) for d in births}
    bodies = [json.dumps(m) for m in sent_messages(stub)]
    # one request per distinct (items, answer): equal prompts are answered from the cache
    assert 0 < len(bodies) == len(set(bodies)) <= len(results)
    assert not [i for i in identifiers if any(str(i) in b for b in bodies)]
    assert all(
        m[0]["content"] == JUDGE_SYSTEM and m[1]["content"].startswith("Plan the physician")
        for m in sent_messages(stub)
    )
    assert np.isfinite(graded.table["recall"]).all()
