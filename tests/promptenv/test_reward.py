"""The reward: plan-item recall and precision in embedding space, ROUGE-L, length."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptenv.reward import (
    PlanScorer,
    RewardWeights,
    answer_segments,
    choose_threshold,
    clean_item,
)

ITEMS = [
    "evaluation of uterine fundal height (procedure)",
    "auscultation of the fetal heart (procedure)",
    "urine screening test for diabetes (procedure)",
    "hepatitis b surface antigen measurement (procedure)",
    "routine antenatal care (regime/therapy)",
    "influenza, seasonal, injectable, preservative free",
]
PLAN = "## Plan\nThe following procedures were conducted:\n" + "\n".join(f"- {i}" for i in ITEMS)
UNRELATED = [
    "Order a chest X-ray to rule out pneumonia.",
    "Prescribe amoxicillin for the ear infection.",
    "Refer to a dentist for a cleaning.",
    "Check the cholesterol panel.",
]


@pytest.fixture(scope="module")
def scorer() -> PlanScorer:
    return PlanScorer()


def test_segments_and_items_are_cleaned() -> None:
    assert clean_item("routine antenatal care (regime/therapy)") == "routine antenatal care"
    assert answer_segments("Plan:\n- Check BP. Test urine.\n2) Flu shot") == [
        "Plan",
        "Check BP",
        "Test urine",
        "Flu shot",
    ]


def test_an_answer_that_lists_the_plan_scores_above_one_that_does_not(scorer: PlanScorer) -> None:
    good = scorer.score("\n".join(f"- {clean_item(i)}" for i in ITEMS), ITEMS, PLAN)
    bad = scorer.score("Rest, drink water, and call if anything changes.", ITEMS, PLAN)
    assert good.recall == 1.0 and good.covered == tuple(range(len(ITEMS)))
    assert bad.recall == 0.0
    assert good.reward > bad.reward + 1.0


@settings(max_examples=25, deadline=None)
@given(order=st.permutations(list(range(len(ITEMS)))), k=st.integers(0, len(ITEMS) - 1))
def test_recall_is_monotone_in_listed_reference_items(
    scorer: PlanScorer, order: list[int], k: int
) -> None:
    fewer = "\n".join(clean_item(ITEMS[i]) for i in order[:k])
    more = "\n".join(clean_item(ITEMS[i]) for i in order[: k + 1])
    a, b = scorer.score_many([fewer, more], [ITEMS, ITEMS], [PLAN, PLAN])
    assert b.recall >= a.recall
    assert set(a.covered) <= set(b.covered)


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, len(ITEMS)), pad=st.integers(1, len(UNRELATED)))
def test_padding_with_unrelated_items_lowers_the_reward(
    scorer: PlanScorer, k: int, pad: int
) -> None:
    answer = "\n".join(f"- {clean_item(i)}" for i in ITEMS[:k])
    padded = answer + "\n" + "\n".join(f"- {u}" for u in UNRELATED[:pad])
    plain, stuffed = scorer.score_many([answer, padded], [ITEMS, ITEMS], [PLAN, PLAN])
    assert stuffed.recall == plain.recall
    assert stuffed.precision < plain.precision
    assert stuffed.reward < plain.reward


def test_length_penalty_applies_beyond_max_words(scorer: PlanScorer) -> None:
    short = PlanScorer(weights=RewardWeights(max_words=10), embedder=scorer.embedder)
    answer = "- " + clean_item(ITEMS[0]) + "\n" + "word " * 30
    s = short.score(answer, ITEMS, PLAN)
    unpenalized = s.recall + 0.5 * s.precision + 0.25 * s.rouge_l
    assert s.reward == pytest.approx(unpenalized - 0.25 * (s.words - 10) / 10)


def test_empty_answer_scores_zero(scorer: PlanScorer) -> None:
    s = scorer.score("", ITEMS, PLAN)
    assert (s.recall, s.precision, s.rouge_l, s.reward) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same length"):
        scorer.score_many(["a"], [], [])


def test_choose_threshold_bounds_false_matches() -> None:
    negatives = [i / 100 for i in range(100)]  # 0.00 .. 0.99
    cut = choose_threshold([0.9, 0.97], negatives, max_false_match=0.05)
    assert 0.95 < cut < 0.951
    assert sum(n >= cut for n in negatives) <= 5
    with pytest.raises(ValueError, match="no positive reaches the cut"):
        choose_threshold([0.1], negatives)
    with pytest.raises(ValueError):
        choose_threshold([], [0.1])


def test_loading_the_embedder_prints_no_progress_bar_and_keeps_the_callers_setting(
    capfd: pytest.CaptureFixture[str],
) -> None:
    from transformers.utils import logging as hf_logging

    from promptenv.reward import Embedder

    hf_logging.enable_progress_bar()  # as in a fresh process
    capfd.readouterr()
    assert Embedder().embed(["routine antenatal care"]).shape == (1, 384)
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
    assert hf_logging.is_progress_bar_enabled()
