"""Paired differences against a base method, bootstrapped over PATIENTS (cluster bootstrap).

Several encounters of one patient are not independent, so this resamples patients
with all their encounters (`promptenv.paired`, which `pmlm evaluate`'s report uses
too), against any base method and on any subset. Reads the per-answer rows that
`pmlm evaluate` writes (``reports/evaluation_results.parquet``)::

    .venv/bin/python benchmarks/paired_by_patient.py pmlm-workspace/reports/evaluation_results.parquet \\
        --base pmlm_initial --metric recall --subset obstetric

Several files (one per cohort, each with its own trained or fallen-back policy) are
pooled: their patients are kept apart even where two cohorts reuse an id, so the
interval resamples the patients of all cohorts together. A pooled ``pmlm`` row is what
each cohort deployed, not one policy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from promptenv.paired import paired_table


def paired_by_patient(
    rows: pd.DataFrame, base: str, metric: str, draws: int = 10_000, seed: int = 0
) -> pd.DataFrame:
    """Per method: mean of (method − base) over encounters, and its patient-bootstrap 95% CI
    (`promptenv.paired.paired_table`, the same as `pmlm evaluate`'s report)."""
    table = paired_table(rows, base, metric, draws, seed)
    return pd.DataFrame(
        {
            "method": table["method"],
            "encounters": table["n"],
            "patients": table["patients"],
            f"{metric} - {base}": table["difference"].round(3),
            "ci_low": table["lo"].round(3),
            "ci_high": table["hi"].round(3),
        }
    )


def pooled(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The per-answer rows of several evaluations as one, each cohort's patient and encounter
    ids prefixed by its position (``0:``, ``1:``, ...); one frame is returned unchanged."""
    if len(frames) == 1:
        return frames[0]
    tagged = [
        rows.assign(
            patient_id=f"{i}:" + rows["patient_id"].astype(str),
            encounter_id=f"{i}:" + rows["encounter_id"].astype(str),
        )
        for i, rows in enumerate(frames)
    ]
    return pd.concat(tagged, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results",
        type=Path,
        nargs="+",
        help="reports/evaluation_results.parquet; several (one per cohort) are pooled",
    )
    parser.add_argument("--base", default="pmlm_initial")
    parser.add_argument("--metric", default="recall")
    parser.add_argument("--subset", choices=["obstetric", "adult", "all"], default="obstetric")
    parser.add_argument("--draws", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = pooled([pd.read_parquet(path) for path in args.results])
    if args.subset != "all":
        rows = rows[rows[f"in_{args.subset}"]]
    print(
        paired_by_patient(rows, args.base, args.metric, args.draws, args.seed).to_string(
            index=False
        )
    )


if __name__ == "__main__":
    main()
