"""Paired differences of the comparison harness."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from promptenv.evaluate import EvalSettings
from promptenv.paired import markdown_differences, paired_differences


def results(n: int, shift: float, noise: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = rng.random(n)
    rows = []
    for i in range(n):
        for method, value in (
            ("pmlm_initial", base[i]),
            ("pmlm", base[i] + shift + noise * rng.standard_normal()),
        ):
            rows.append(
                {
                    "encounter_id": f"e{i}",
                    "method": method,
                    "in_obstetric": i % 2 == 0,
                    "in_adult": i % 2 == 1,
                    "recall": value,
                    "reward": value,
                }
            )
    return pd.DataFrame(rows)


def test_a_constant_shift_is_found_exactly_and_pairing_removes_between_encounter_spread() -> None:
    table = paired_differences(results(40, 0.1, 0.0), EvalSettings(bootstrap=200))
    assert set(table["subset"]) == {"obstetric", "adult"} and (table["n"] == 20).all()
    assert np.allclose(table["difference"], 0.1)
    assert np.allclose(table["lo"], 0.1) and np.allclose(table["hi"], 0.1)
    # base values spread over [0, 1]; unpaired intervals of two methods would overlap widely
    assert "**+0.100 [+0.100, +0.100]**" in markdown_differences(table)


def test_no_shift_gives_an_interval_around_zero() -> None:
    table = paired_differences(results(200, 0.0, 0.05, seed=3), EvalSettings(bootstrap=500))
    assert ((table["lo"] < 0) & (table["hi"] > 0)).all()
    assert "**" not in markdown_differences(table)


def clustered(n_patients: int, per_patient: int, seed: int = 0) -> pd.DataFrame:
    """Differences that are one number per patient, the same for all her encounters."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        effect = rng.normal(0.1, 0.2)
        for e in range(per_patient):
            for method, value in (("pmlm_initial", 0.3), ("pmlm", 0.3 + effect)):
                rows.append(
                    {
                        "encounter_id": f"p{p}e{e}",
                        "patient_id": f"p{p}",
                        "method": method,
                        "in_obstetric": True,
                        "in_adult": False,
                        "recall": value,
                        "reward": value,
                    }
                )
    return pd.DataFrame(rows)


def old_cluster_bootstrap(rows: pd.DataFrame, draws: int, seed: int) -> tuple[float, float]:
    """The numpy cluster bootstrap benchmarks/paired_by_patient.py had before promptenv.paired."""
    wide = rows.pivot_table(
        index=["encounter_id", "patient_id"], columns="method", values="recall"
    ).reset_index()
    per = wide.assign(d=wide["pmlm"] - wide["pmlm_initial"]).groupby("patient_id")["d"]
    sums, counts = per.sum().to_numpy(), per.count().to_numpy()
    idx = np.random.default_rng(seed).integers(0, len(sums), size=(draws, len(sums)))
    lo, hi = np.percentile(sums[idx].sum(1) / counts[idx].sum(1), [2.5, 97.5])
    return float(lo), float(hi)


def test_the_interval_resamples_patients_not_encounters() -> None:
    from promptenv.paired import paired_table

    rows = clustered(12, 5)
    by_patient = paired_table(rows, "pmlm_initial", "recall", 4000, 0).iloc[0]
    by_encounter = paired_table(rows.drop(columns="patient_id"), "pmlm_initial", "recall", 4000, 0)
    assert (by_patient["n"], by_patient["patients"]) == (60, 12)
    # five encounters of a patient carry one patient's worth of information
    width = by_patient["hi"] - by_patient["lo"]
    assert width > 1.8 * (by_encounter["hi"] - by_encounter["lo"]).iloc[0]
    # the benchmark's former bootstrap finds the same interval (up to resampling noise)
    lo, hi = old_cluster_bootstrap(rows, 4000, 1)
    assert abs(by_patient["lo"] - lo) < 0.1 * width and abs(by_patient["hi"] - hi) < 0.1 * width


def test_the_report_compares_against_the_policy_when_it_was_evaluated() -> None:
    from promptenv.paired import paired_baseline, paired_section

    rows = clustered(6, 2)
    assert paired_baseline(rows) == "pmlm"
    section = paired_section(rows, EvalSettings(bootstrap=200))
    assert "against the policy (pmlm)" in section and "bootstrapped over patients" in section
    assert "| obstetric | recall | pmlm_initial | 12 | 6 |" in section
    initial_only = rows.assign(method=rows["method"].replace({"pmlm": "peer"}))
    assert paired_baseline(initial_only) == "pmlm_initial"
    assert "| obstetric | recall | peer | 12 | 6 |" in paired_section(initial_only, EvalSettings())


def test_no_gap_closed_where_the_oracle_is_hardly_above_general() -> None:
    from promptenv.evaluate import MIN_GAP, aggregate, gap_note

    # the main job's adult rows on 2026-12-07: oracle 0.042, general 0.021, self 0.292
    recall = {"general": 0.021, "self": 0.292, "peer": 0.0, "oracle": 0.042}
    recall_ob = {"general": 0.076, "self": 0.299, "peer": 0.562, "oracle": 0.688}
    rows = [
        {"method": m, "recall": r, "in_adult": True, "in_obstetric": False}
        for m, r in recall.items()
    ] + [
        {"method": m, "recall": r, "in_adult": False, "in_obstetric": True}
        for m, r in recall_ob.items()
    ]
    results = pd.DataFrame(rows).assign(
        precision=0.0,
        rouge_l=0.0,
        reward=0.0,
        words=10,
        prompt_tokens=50,
        llm_calls=0,
        input_tokens=50,
        output_tokens=10,
    )
    table = aggregate(results, EvalSettings(bootstrap=50)).set_index(["subset", "method"])
    assert table["gap_closed"].loc["adult"].isna().all()  # was 13.00 for self, -1.00 for peer
    assert table.loc[("obstetric", "peer"), "gap_closed"] == pytest.approx(0.486 / 0.612)
    note = gap_note(table.reset_index())
    assert note.startswith(f"No gap closed for adult: the oracle is less than {MIN_GAP:.2f}")
    assert "Above the oracle" not in note  # self beats the oracle where no gap is shown
    shown = pd.DataFrame(rows).assign(subset=lambda d: np.where(d.in_adult, "adult", "obstetric"))
    shown.loc[shown.method.eq("oracle") & shown.in_adult, "recall"] = 0.25
    assert gap_note(shown).startswith("Above the oracle (adult: self)")


def test_gap_note_names_the_methods_that_beat_the_oracle_per_subset() -> None:
    from promptenv.evaluate import gap_note

    table = pd.DataFrame(
        {
            "subset": ["adult"] * 3 + ["obstetric"] * 3,
            "method": ["general", "peer", "oracle"] * 2,
            "recall": [0.0, 0.5, 0.25, 0.0, 0.5, 0.6],
        }
    )
    note = gap_note(table)
    assert note.startswith("Above the oracle (adult: peer)")
    assert "obstetric" not in note
    assert gap_note(table[table["subset"] == "obstetric"]) == ""
    assert gap_note(table[table["method"] != "oracle"]) == ""  # no oracle evaluated


def test_the_main_jobs_sample_makes_up_a_missing_subset_from_the_other(
    default_tables: dict[str, pd.DataFrame],
) -> None:
    from promptenv.encounters import pick_encounters

    index = default_tables["index_encounters"]
    asked = EvalSettings(n_obstetric=12, n_adult=4, make_up=True)
    usual = pick_encounters(index, asked)
    assert usual.equals(pick_encounters(index, EvalSettings(n_obstetric=12, n_adult=4)))
    men = index.assign(is_obstetric=False)
    made_up = pick_encounters(men, asked)
    assert (made_up["in_obstetric"].sum(), made_up["in_adult"].sum()) == (0, 16)
    exact = pick_encounters(men, EvalSettings(n_obstetric=12, n_adult=4))  # pmlm evaluate's
    assert (exact["in_obstetric"].sum(), exact["in_adult"].sum()) == (0, 4)
    assert set(exact["encounter_id"]) < set(made_up["encounter_id"])  # kept, and 12 more
