"""Paired differences of the comparison harness."""

from __future__ import annotations

import numpy as np
import pandas as pd

from promptenv.evaluate import EvalSettings, markdown_differences, paired_differences


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
