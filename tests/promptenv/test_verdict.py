"""The closing sentence of the main job and `pmlm evaluate`."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from promptenv.verdict import verdict


def _results(
    recall: dict[str, float], noise: float, patients: int = 10, seed: int = 0
) -> pd.DataFrame:
    """Two encounters per patient; each method's recall = its level + the patient's own offset
    + per-answer noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        offset = rng.normal(0, 0.1)
        for e in range(2):
            for method, level in recall.items():
                rows.append(
                    {
                        "encounter_id": f"e{p}-{e}",
                        "patient_id": f"p{p}",
                        "method": method,
                        "recall": level + offset + rng.normal(0, noise),
                        "in_obstetric": True,
                        "in_adult": False,
                    }
                )
    return pd.DataFrame(rows)


def test_a_clear_win_is_called_a_win_with_the_right_sign() -> None:
    rows = _results(
        {"general": 0.1, "peer": 0.4, "pmlm_initial": 0.3, "pmlm": 0.7, "oracle": 0.9}, 0.02
    )
    sentence = verdict(rows)
    assert "On 20 obstetric test encounters of 10 patients" in sentence
    assert "(peer, " in sentence  # the best fixed prompt on these encounters
    # pmlm − peer is about +0.3, pmlm − general about +0.6 (not the other way round)
    diffs = [float(d) for d in re.findall(r"\): ([+-]\d\.\d{3}) \[", sentence)]
    assert len(diffs) == 2 and abs(diffs[0] - 0.3) < 0.05 and abs(diffs[1] - 0.6) < 0.05
    assert sentence.endswith(
        "Verdict: PMLM beats the best fixed prompt on them (peer) and beats the bare question (general)."
    )
    assert "oracle" not in sentence  # the oracle is not a prompt one could deploy


def test_a_tie_within_chance_is_not_rounded_to_a_win() -> None:
    rows = _results({"general": 0.1, "peer": 0.5, "pmlm": 0.5}, 0.0)
    # pmlm is 0.25 ahead for half the patients and 0.25 behind for the others: no mean gain
    swing = rows["patient_id"].map(lambda p: 0.25 if int(p[1:]) % 2 else -0.25)
    rows.loc[rows["method"] == "pmlm", "recall"] += swing[rows["method"] == "pmlm"]
    sentence = verdict(rows)
    assert "is not distinguishable from the best fixed prompt on them (peer)" in sentence
    assert "beats the bare question" in sentence


def test_a_loss_is_said_plainly() -> None:
    rows = _results({"general": 0.3, "peer": 0.6, "pmlm": 0.2}, 0.02)
    assert (
        "PMLM is worse than the best fixed prompt on them (peer) and is worse than the bare question"
        in verdict(rows)
    )


def test_one_patient_gives_no_interval_and_says_so() -> None:
    rows = _results({"general": 0.1, "peer": 0.4, "pmlm": 0.7}, 0.02, patients=1)
    sentence = verdict(rows)
    assert sentence.startswith("On 2 obstetric test encounters of 1 patient,")
    assert "cannot be judged on one patient" in sentence and "nan" not in sentence


def test_no_policy_no_sentence() -> None:
    assert verdict(_results({"general": 0.1, "peer": 0.4}, 0.02)) == ""
    assert verdict(_results({"pmlm": 0.4}, 0.02)) == ""


def test_prompts_that_are_the_best_fixed_ones_are_said_to_be_the_same() -> None:
    """A policy that fell back to the peer prompt answers exactly as peer: +0.000, no sign."""
    rows = _results({"general": 0.1, "peer": 0.5}, 0.02)
    same = rows[rows["method"] == "peer"].assign(method="pmlm")
    sentence = verdict(pd.concat([rows, same], ignore_index=True))
    assert "(peer, " in sentence and "+0.000 [+0.000, +0.000]" in sentence
    assert "-0.000" not in sentence
    assert "PMLM gives the same recall as the best fixed prompt on them (peer)" in sentence


def test_without_obstetric_encounters_the_sentence_is_on_the_adult_ones() -> None:
    from promptenv.verdict import closing_verdict

    rows = _results({"general": 0.1, "peer": 0.4, "pmlm": 0.4}, 0.02)
    assert closing_verdict(rows, reps=500).startswith("On 20 obstetric test encounters")
    men = rows.assign(in_obstetric=False, in_adult=True)  # a cohort of men
    sentence = closing_verdict(men, reps=500)
    assert sentence.startswith(
        "No obstetric encounter among the test patients evaluated. On 20 adult test encounters"
    )
    assert sentence.endswith("and beats the bare question (general).")
    assert closing_verdict(men[men["method"] != "pmlm"], reps=500) == ""
    assert closing_verdict(men.assign(in_adult=False), reps=500) == ""
