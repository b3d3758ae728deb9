"""Every benchmark script still imports and parses its own ``--help``.

The benchmarks are not run in CI (they take minutes to hours), so without this a renamed
function breaks one silently until someone runs it (`benchmarks/out_of_fold.py` imported a
class from the wrong module for a day). Importing runs each script's imports and
definitions, not its ``main``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


def _load(name: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Import ``benchmarks/NAME.py`` (its imports and definitions, not its ``main``)."""
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_there_are_benchmarks() -> None:
    assert len(BENCHMARKS) >= 10


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_and_prints_help(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _load(path.stem, monkeypatch)
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
    monkeypatch.setattr(sys, "argv", [path.name, "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 0
    assert "usage:" in out.getvalue()


def test_edit_gains_power_counts_the_draws_whose_interval_is_above_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import numpy as np

    eg = _load("edit_gains", monkeypatch)
    patients = np.array([f"p{i // 2}" for i in range(80)], dtype=object)
    rng = np.random.default_rng(1)
    clear = 0.5 + rng.normal(0, 0.01, 80)  # every patient gains: every interval is above 0
    noise = rng.normal(0, 1, 80) - rng.normal(0, 1, 80).mean()
    assert eg.power(clear, patients, 10, 20, 200) == pytest.approx((clear.mean(), 1.0))
    mean, share = eg.power(noise, patients, 10, 40, 200)
    assert 0.0 <= share < 0.3  # a zero-mean gain rarely clears it (5% expected)
    assert mean == pytest.approx(noise.mean())


def test_edit_gains_history_features_read_only_the_plans_before_the_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from promptenv.editing import EditCase
    from promptenv.prompts import fixed_config

    eg = _load("edit_gains", monkeypatch)
    plans = pd.DataFrame(
        {
            "encounter_id": ["e1", "e2"],
            "time": pd.to_datetime(["2020-01-01", "2021-01-01"]),
            "n_items": [2, 2],
            "plan_text": ["a b", "b c"],
        }
    )
    items = pd.DataFrame(
        {
            "encounter_id": ["e1", "e1", "e2", "e2"],
            "display": ["a", "b", "b", "c"],
            "position": [0, 1, 0, 1],
        }
    )

    def case(n_plans: int) -> EditCase:
        ctx = SimpleNamespace(reference_plans=plans.iloc[:n_plans], plan_items=items)
        return EditCase(
            f"x{n_plans}",
            ctx,
            None,
            np.zeros(1, np.float32),  # type: ignore[arg-type]
            reference_items=("next plan item",),
        )

    seen: list[tuple[str, ...]] = []

    def proxy(scored: EditCase, config: object) -> float:
        seen.append(scored.reference_items)
        return 0.25 if config == fixed_config("peer") else 0.75

    candidates = {"peer": fixed_config("peer"), "self": fixed_config("self")}
    got = eg.history_features([case(0), case(1), case(2)], candidates, proxy)
    # has a plan, plans / 10, Jaccard of the last two, cover per candidate, cover − peer's
    np.testing.assert_allclose(got[0], [0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(got[1], [1, 0.1, 0, 0.25, 0.75, 0.5])
    np.testing.assert_allclose(got[2], [1, 0.2, 1 / 3, 0.25, 0.75, 0.5])
    assert ("next plan item",) not in seen  # scored against the last plan, never the next
    assert seen[-1] == ("b", "c")


def test_edit_gains_best_choice_takes_the_highest_predicted_gain_or_peer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import numpy as np

    eg = _load("edit_gains", monkeypatch)
    predicted = np.array([[0.1, 0.3], [-0.2, -0.1], [0.5, 0.0]])
    gains = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    np.testing.assert_array_equal(eg.best_choice_gain(predicted, gains), [2.0, 0.0, 5.0])


def test_paired_by_patient_pools_cohorts_and_keeps_their_patients_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pandas as pd

    pbp = _load("paired_by_patient", monkeypatch)

    def cohort(gain: float) -> pd.DataFrame:  # two patients, p1 and p2, in every cohort
        return pd.DataFrame(
            [
                {"encounter_id": f"e{p}{k}", "patient_id": f"p{p}", "method": m, "recall": r}
                for p in (1, 2)
                for k in range(p)  # p1 has one encounter, p2 two
                for m, r in (("peer", 0.5), ("pmlm", 0.5 + gain * p))
            ]
        )

    one, two = cohort(0.1), cohort(-0.1)
    assert pbp.pooled([one]) is one
    table = pbp.paired_by_patient(pbp.pooled([one, two]), "peer", "recall", draws=200)
    row = table.set_index("method").loc["pmlm"]
    assert (row["encounters"], row["patients"]) == (6, 4)  # p1 of one cohort is not p1 of the other
    # the encounter-weighted mean over both cohorts: (0.1 + 0.2 + 0.2) − (0.1 + 0.2 + 0.2) = 0
    assert row["recall - peer"] == pytest.approx(0.0)
    assert row["ci_low"] < 0 < row["ci_high"]
    alone = pbp.paired_by_patient(one, "peer", "recall", draws=200).set_index("method")
    assert alone.loc["pmlm", "recall - peer"] == pytest.approx(0.5 / 3, abs=1e-3)  # rounded
