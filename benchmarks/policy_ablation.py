"""PPO on LLM rewards alone against PPO with the learned reward model, at the same LLM budget.

Both policies train on the same TRAINING encounters, keep their best checkpoint on
the same VALIDATION encounters, start from the same best fixed prompt (chosen on
validation) and may spend the same number of new LLM answers (``--budget``,
counted as in `promptenv.policy`: answers not in the cache, every one of
training's). Then both, the fixed prompts and the oracle answer the same TEST
encounters (all of them by default: ``--n-obstetric``/``--n-adult`` cap them), with
the workspace's calibration. Prints the methods table and the recall differences
against the best fixed prompt and between the two policies, paired and
bootstrapped over patients. Nothing is chosen on test patients.

The workspace must hold a prepared cohort with a fitted recommender (``pmlm run``
or ``pmlm ingest`` + ``pmlm recsys fit``)::

    .venv/bin/python benchmarks/policy_ablation.py -w pmlm-workspace --budget 500

Each training saves its policy in ``WORKSPACE/models/ablation/{llm,model}`` (the
workspace's own policy is not touched) and the per-answer rows go to
``WORKSPACE/reports/ablation_results.parquet``. The answers are cached in the
workspace's LLM cache: a second run of the same command costs no LLM call.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from pipelines.ingest import load_tables
from pipelines.workspace import Workspace
from promptenv.calibration import workspace_calibration
from promptenv.encounters import EvalSettings
from promptenv.evaluate import evaluate_methods, markdown_table
from promptenv.llm import LLMClient
from promptenv.paired import paired_table
from promptenv.policy import PolicySettings, train_policy, training_summary
from promptenv.search import PolicyEdits
from promptenv.steps import WorkspaceSignals, workspace_versions

FIXED = ("general", "self", "peer", "pmlm_initial")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-w", "--workspace", type=Path, default=Path("pmlm-workspace"))
    parser.add_argument("--backend", default="local")
    parser.add_argument("--budget", type=int, default=500, help="new LLM answers per training")
    parser.add_argument("--n-train", type=int, default=96)
    parser.add_argument("--n-validation", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="reward-model rounds")
    parser.add_argument("--round-steps", type=int, default=2048, help="PPO steps per round")
    parser.add_argument(
        "--llm-timesteps",
        type=int,
        default=8192,
        help="PPO steps on LLM rewards (the budget stops it)",
    )
    parser.add_argument("--n-obstetric", type=int, default=10_000)
    parser.add_argument("--n-adult", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ws = Workspace.at(args.workspace)
    tables = load_tables(ws)
    client = LLMClient(args.backend, workspace=ws)
    base = PolicySettings(
        n_train=args.n_train,
        n_validation=args.n_validation,
        max_llm_calls=args.budget,
        seed=args.seed,
    )
    calibration = workspace_calibration(ws, client, tables, base.n_calibration, params=base.params)
    print(f"LLM {client.label}; threshold {calibration.threshold} ({calibration.chosen_on})")
    variants = {
        "llm": replace(base, timesteps=args.llm_timesteps),
        "model": replace(
            base,
            reward_model=True,
            model_rounds=args.rounds,
            model_timesteps=args.round_steps,
            timesteps=args.rounds * args.round_steps,
        ),
    }
    policies = {}
    for name, settings in variants.items():
        started = time.perf_counter()
        trained = train_policy(
            client,
            tables,
            WorkspaceSignals(ws),
            ws.models_dir / "ablation" / name,
            settings,
            versions=workspace_versions(ws),
            progress=print,
            calibration=calibration,
        )
        policies[f"pmlm_{name}"] = trained.policy
        print(
            f"[{name}] {training_summary(trained.policy)}; wall {time.perf_counter() - started:.0f} s"
        )

    eval_settings = EvalSettings(n_obstetric=args.n_obstetric, n_adult=args.n_adult)
    result = evaluate_methods(
        client,
        tables,
        WorkspaceSignals(ws),
        [*FIXED, "oracle"],
        eval_settings,
        progress=print,
        edit_methods={n: PolicyEdits(p) for n, p in policies.items()},
        calibration=calibration,
    )
    ws.reports_dir.mkdir(parents=True, exist_ok=True)
    result.results.to_parquet(ws.reports_dir / "ablation_results.parquet", index=False)
    print("\n" + markdown_table(result.table))
    rows = result.results
    for subset in ("obstetric", "adult"):
        sub = rows[rows[f"in_{subset}"]]
        means = sub.groupby("method")["recall"].mean()
        best = max(FIXED, key=lambda m: means.get(m, float("-inf")))
        print(f"\n{subset}: best fixed prompt on these test encounters: {best} ({means[best]:.3f})")
        for baseline in (best, "pmlm_llm"):
            table = paired_table(sub, baseline, "recall", 10_000, args.seed)
            keep = table[table["method"].isin(["pmlm_llm", "pmlm_model"])]
            for r in keep.itertuples(index=False):
                print(
                    f"  recall {r.method} − {baseline}: {r.difference:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}] "
                    f"({r.n} encounters, {r.patients} patients)"
                )
    print("\nPer-answer rows:", ws.reports_dir / "ablation_results.parquet")


if __name__ == "__main__":
    pd.set_option("display.width", 160)
    main()
