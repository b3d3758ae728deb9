"""Fit (tuned on validation patients) and compare every recommender on a workspace's test patients.

    .venv/bin/python benchmarks/recsys_compare.py --workspace /tmp/pmlm-dev-ws

Prints the fit timings, the validation choices, and the test comparison table
(all index encounters and the obstetric subset), which is also written to
WORKSPACE/reports/recsys_comparison.{csv,md}. Add ``--reuse`` to evaluate the
models already saved in the workspace instead of refitting them.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pandas as pd

from recsys.evaluate import BASELINES, PERSONALIZED_MODELS, to_markdown
from recsys.steps import evaluate_models, fit_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", "-w", default="pmlm-workspace")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--select-on", default="all", choices=["all", "obstetric", "adult"])
    parser.add_argument("--reuse", action="store_true", help="evaluate saved models, do not refit")
    args = parser.parse_args()

    started = time.perf_counter()
    if not args.reuse:

        def say(msg: str) -> None:
            print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

        summary = fit_models(args.workspace, k=args.k, select_on=args.select_on, progress=say)
        print(f"\nfit + tuning: {time.perf_counter() - started:.1f} s")
        print(to_markdown(summary.validation))
    t0 = time.perf_counter()
    table = evaluate_models(args.workspace, k=args.k)
    print(f"test evaluation: {time.perf_counter() - t0:.1f} s\n")
    print(to_markdown(table))

    ndcg = f"ndcg@{args.k}"
    obstetric = table[table["subset"] == "obstetric"].set_index("model")[ndcg]
    pop = obstetric["popularity"]
    singles = [m for m in (*BASELINES, *PERSONALIZED_MODELS) if m in obstetric.index]
    personalized = [m for m in obstetric.index if m not in BASELINES]
    best = max(personalized, key=lambda m: obstetric[m])
    print(
        pd.Series(
            {
                "best personalized on test (obstetric)": best,
                f"its {ndcg} / popularity": round(obstetric[best] / pop, 3),
                "at least as good as every single model": bool(
                    obstetric[best] >= obstetric[singles].max()
                ),
            }
        ).to_string()
    )


if __name__ == "__main__":
    main()
