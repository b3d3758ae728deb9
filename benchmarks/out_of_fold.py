"""What the reward-model learner's variants gain over the start prompt on training patients
they never learnt from (issue 13).

One data set, the one `pmlm policy train --reward-model` collects (the same sample, start
choice and budgeted loop, `promptenv.reward_model.learn_with_reward_model`), then for each
variant the out-of-fold check that decides the fall-back (`out_of_fold_gains`): per fold of
training patients, a fresh PPO run against a reward model fitted without that fold, its
deterministic edits of the fold's encounters scored by the LLM. Every variant sees the same
folds in the same order, so their gains are paired per encounter. Only TRAIN and
VALIDATION patients are read.

A variant is ``target[,pessimism=K][,smooth]``: ``gain`` or ``reward``
(`PolicySettings.model_target`), the trees' sds taken off predicted rewards
(``model_pessimism``), and ``smooth`` (``model_smooth``: PPO sees the model's prediction
for every pair but the start's). With a warm LLM cache the loop's budget buys more
answers than it would on a cold one (a cached answer is not an LLM call), and the loop
keeps no answers back for the check, which runs here once per variant.

    .venv/bin/python benchmarks/out_of_fold.py -w pmlm-workspace
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from pipelines.workspace import Workspace
from promptenv.calibration import workspace_calibration
from promptenv.llm import LLMClient
from promptenv.paired import cluster_bootstrap_ci
from promptenv.policy import PolicySettings, choose_start, make_training, prepare_episodes
from promptenv.reward_model import (
    CoverageProxy,
    ScoredAnswers,
    learn_with_reward_model,
    out_of_fold_gains,
)
from promptenv.steps import WorkspaceSignals, load_tables

DEFAULT_VARIANTS = "gain;reward;gain,pessimism=1;gain,smooth"


def variant_settings(base: PolicySettings, spec: str) -> PolicySettings:
    """``base`` with the variant ``spec`` (see the module docstring); a bad spec exits."""
    target, *options = spec.split(",")
    changes: dict[str, object] = {"model_target": target}
    for option in options:
        name, _, value = option.partition("=")
        if name == "pessimism":
            changes["model_pessimism"] = float(value)
        elif name == "smooth" and not value:
            changes["model_smooth"] = True
        else:
            raise SystemExit(f"variant {spec!r}: unknown option {option!r} (pessimism=K, smooth)")
    try:
        return replace(base, **changes)  # type: ignore[arg-type]
    except ValueError as error:
        raise SystemExit(f"variant {spec!r}: {error}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--workspace", required=True)
    parser.add_argument("--backend", default="local")
    parser.add_argument("--n-train", type=int, default=160)
    parser.add_argument("--n-validation", type=int, default=48)
    parser.add_argument("--max-llm-calls", type=int, default=1000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0, help="PPO steps per fold (0: kept's)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="';'-separated")
    parser.add_argument("--reps", type=int, default=4000, help="bootstrap resamples")
    args = parser.parse_args()

    base = PolicySettings(
        n_train=args.n_train,
        n_validation=args.n_validation,
        max_llm_calls=args.max_llm_calls,
        reward_model=True,
        folds=0,
    )
    variants = {spec: variant_settings(base, spec) for spec in args.variants.split(";")}
    started = time.perf_counter()
    ws = Workspace.at(args.workspace)
    client, tables = LLMClient(args.backend, workspace=ws), load_tables(ws)
    calibration = workspace_calibration(
        ws, client, tables, base.n_calibration, params=base.params, progress=print
    )
    episodes = prepare_episodes(client, tables, WorkspaceSignals(ws), base, print, calibration)
    start = choose_start(episodes, print)
    model, eval_env = make_training(episodes, start, base)
    data = ScoredAnswers()
    log = learn_with_reward_model(
        model, episodes.train, eval_env, episodes.reward, start, base, print, data=data
    )
    steps = args.steps or int(log.best.timesteps if log.best else log.timesteps)
    proxy = CoverageProxy(episodes.reward.scorer)
    print(
        f"\ndata: {len(data.targets)} scored answers on {len(episodes.train)} training "
        f"encounters, start {start.method}, {episodes.reward.llm_calls} new LLM calls, "
        f"{time.perf_counter() - started:.0f} s; {args.folds} folds of {steps} PPO steps\n"
    )
    results = {}
    for spec, settings in variants.items():
        before, began = episodes.reward.llm_calls, time.perf_counter()
        got = out_of_fold_gains(
            episodes.train,
            data,
            proxy,
            episodes.reward,
            start,
            replace(settings, folds=args.folds),
            steps,
            10**9,
            print,
        )
        assert got is not None  # no budget limit here; fewer patients than folds exits above
        results[spec] = got
        print(
            f"{spec}: {episodes.reward.llm_calls - before} new LLM calls, "
            f"{time.perf_counter() - began:.0f} s"
        )
    first = next(iter(results))
    obstetric = {c.encounter_id: c.is_obstetric for c in episodes.train}
    print(
        f"\n| variant | n | patients | edited | out-of-fold gain over {start.method} "
        f"[95% CI, patients] | obstetric | − {first} |"
    )
    print("|---|---|---|---|---|---|---|")
    base_gains = results[first].gains
    for spec, held in results.items():
        gains, who = held.gains, held.patients
        assert held.encounters == results[first].encounters  # the same folds, in order
        ob = np.array([obstetric[e] for e in held.encounters])
        low, high = cluster_bootstrap_ci(gains, who, args.reps, 0)
        o_low, o_high = cluster_bootstrap_ci(gains[ob], who[ob], args.reps, 0)
        diff = gains - base_gains
        d_low, d_high = cluster_bootstrap_ci(diff, who, args.reps, 0)
        paired = "—" if spec == first else f"{diff.mean():+.3f} [{d_low:+.3f}, {d_high:+.3f}]"
        print(
            f"| {spec} | {len(gains)} | {len(set(who))} | {held.edited.mean():.0%} | "
            f"{gains.mean():+.3f} [{low:+.3f}, {high:+.3f}] | {gains[ob].mean():+.3f} "
            f"[{o_low:+.3f}, {o_high:+.3f}] (n {int(ob.sum())}) | {paired} |"
        )
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
