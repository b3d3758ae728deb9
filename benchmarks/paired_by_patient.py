"""Paired differences against a base method, bootstrapped over PATIENTS (cluster bootstrap).

`pmlm evaluate` bootstraps over encounters; several encounters of one patient are
not independent, so this resamples patients with all their encounters. Reads the
per-answer rows that `pmlm evaluate` writes (``reports/evaluation_results.parquet``)::

    .venv/bin/python benchmarks/paired_by_patient.py pmlm-workspace/reports/evaluation_results.parquet \\
        --base pmlm_initial --metric recall --subset obstetric
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def paired_by_patient(
    rows: pd.DataFrame, base: str, metric: str, draws: int = 10_000, seed: int = 0
) -> pd.DataFrame:
    """Per method: mean of (method − base) over encounters, and its patient-bootstrap 95% CI."""
    wide = rows.pivot_table(
        index=["encounter_id", "patient_id"], columns="method", values=metric
    ).reset_index()
    if base not in wide:
        raise SystemExit(f"no method {base!r} in these rows: {sorted(rows['method'].unique())}")
    patients = wide["patient_id"].unique()
    rng = np.random.default_rng(seed)
    draws_idx = rng.integers(0, len(patients), size=(draws, len(patients)))
    out = []
    for method in sorted(set(rows["method"]) - {base}):
        diff = (wide[method] - wide[base]).rename("d")
        per = (
            wide.assign(d=diff)
            .dropna(subset=["d"])
            .groupby("patient_id")["d"]
            .agg(["sum", "count"])
        )
        per = per.reindex(patients).fillna(0.0)
        sums, counts = (
            per["sum"].to_numpy()[draws_idx].sum(1),
            per["count"].to_numpy()[draws_idx].sum(1),
        )
        boots = sums[counts > 0] / counts[counts > 0]
        lo, hi = np.percentile(boots, [2.5, 97.5])
        out.append(
            {
                "method": method,
                "encounters": int(diff.notna().sum()),
                "patients": int((per["count"] > 0).sum()),
                f"{metric} - {base}": round(float(diff.mean()), 3),
                "ci_low": round(float(lo), 3),
                "ci_high": round(float(hi), 3),
            }
        )
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="reports/evaluation_results.parquet")
    parser.add_argument("--base", default="pmlm_initial")
    parser.add_argument("--metric", default="recall")
    parser.add_argument("--subset", choices=["obstetric", "adult", "all"], default="obstetric")
    parser.add_argument("--draws", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = pd.read_parquet(args.results)
    if args.subset != "all":
        rows = rows[rows[f"in_{args.subset}"]]
    print(
        paired_by_patient(rows, args.base, args.metric, args.draws, args.seed).to_string(
            index=False
        )
    )


if __name__ == "__main__":
    main()
