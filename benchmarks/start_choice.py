"""How many validation encounters the choice of the start prompt needs.

Training starts every episode from the fixed prompt (`promptenv.prompts.CONFIG_METHODS`)
with the best mean reward on its validation encounters (`promptenv.policy.choose_start`),
and a policy that does not beat it falls back to it. This script answers every fixed
prompt on ``--n`` VALIDATION encounters (no test patient is read), takes the choice on
all of them as the reference, and draws random subsets of each size in ``--sizes``: how
often a subset's choice agrees with the reference, and how much mean reward (on all
``--n``) the subset's choice gives up. Prints a Markdown table.

    .venv/bin/python benchmarks/start_choice.py -w pmlm-workspace --n 24 --sizes 4,8,12
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipelines.ingest import load_tables
from pipelines.workspace import Workspace
from promptenv.calibration import workspace_calibration
from promptenv.llm import LLMClient
from promptenv.policy import PolicySettings, prepare_episodes
from promptenv.prompts import CONFIG_METHODS, fixed_config
from promptenv.steps import WorkspaceSignals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--workspace", required=True)
    parser.add_argument("--backend", default="local")
    parser.add_argument("--n", type=int, default=24, help="validation encounters")
    parser.add_argument("--sizes", default="4,8,12", help="subset sizes, comma-separated")
    parser.add_argument("--draws", type=int, default=2000, help="subsets per size")
    args = parser.parse_args()

    started = time.perf_counter()
    ws = Workspace.at(args.workspace)
    client, tables = LLMClient(args.backend, workspace=ws), load_tables(ws)
    settings = PolicySettings(n_train=2, n_validation=args.n)
    calibration = workspace_calibration(
        ws, client, tables, settings.n_calibration, params=settings.params, progress=print
    )
    episodes = prepare_episodes(
        client, tables, WorkspaceSignals(ws), settings, lambda _m: None, calibration
    )
    cases, reward = episodes.validation, episodes.reward
    rewards = np.array(
        [
            [a.score.reward for a in reward.answer_many([(c, fixed_config(m)) for c in cases])]
            for m in CONFIG_METHODS
        ]
    ).T  # encounters × methods
    means = rewards.mean(axis=0)
    # the same tie rule as choose_start: the earlier method in CONFIG_METHODS
    best = int(np.argmax(means))
    print(
        f"{len(cases)} validation encounters of "
        f"{len({str(c.context.patient['patient_id']) for c in cases})} patients, "
        f"{reward.llm_calls} new LLM calls, {time.perf_counter() - started:.0f} s; mean reward: "
        + ", ".join(f"{m} {v:+.3f}" for m, v in zip(CONFIG_METHODS, means, strict=True))
        + f"; choice on all: {CONFIG_METHODS[best]}\n"
    )
    print("| validation encounters | same choice as on all | mean reward given up (on all) |")
    print("|---|---|---|")
    rng = np.random.default_rng(0)
    for size in (int(s) for s in args.sizes.split(",")):
        picks = np.array(
            [
                int(np.argmax(rewards[rng.choice(len(cases), size, replace=False)].mean(axis=0)))
                for _ in range(args.draws)
            ]
        )
        same = float((picks == best).mean())
        regret = float((means[best] - means[picks]).mean())
        print(f"| {size} | {same:.0%} | {regret:.3f} |")


if __name__ == "__main__":
    main()
