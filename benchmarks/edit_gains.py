"""What single edits of the peer prompt gain, and whether features predict who gains.

The learned policy starts from the best fixed prompt (peer on the default cohort) and
must beat it. This script measures, on TRAIN and VALIDATION encounters only (no test
patient is read), how much room there is: every candidate in ``--edits`` (one or two
edits of the peer config) is answered by the LLM on the encounters `pmlm policy train`
would sample (``--n-train``, ``--n-validation``, its seed and per-patient cap) and scored
with the workspace's calibrated `PlanScorer`. For each candidate it prints:

- the mean plan-item recall and reward, and the paired difference against peer with a
  95% interval bootstrapped over patients (`promptenv.paired.cluster_bootstrap_ci`);
- how often the candidate is better, worse or equal per encounter;
- the gain of choosing the candidate per encounter when a model, fitted on the OTHER
  patients' encounters, predicts that it beats peer (leave-one-patient-out, scikit-learn's
  extra trees on the policy's own observation features `EditCase.features`, the reward
  model's learner): is the per-patient choice predictable from what a policy sees?
  With more than one candidate, a last row per subset chooses among all of them (the
  one with the highest predicted gain, if it is above 0; else peer);
- the same choice with the patient's plan history added to those features
  (`history_features`: what her earlier plans, known at the index time, say; the
  policy's observation does not hold them): would that information make it predictable?

With ``--power-patients P``, it also asks how often a per-encounter choice that gains
what the leave-one-patient-out choice gains here would clear its interval on a test split
of P patients (the default cohort has 17 obstetric test patients): it draws P patients of
the subset without replacement ``--power-draws`` times and counts the draws whose
interval, bootstrapped over those patients, lies above 0.

    .venv/bin/python benchmarks/edit_gains.py -w pmlm-workspace --n-train 240 --n-validation 16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from sklearn.ensemble import ExtraTreesRegressor

from pipelines.index import ContextStore
from pipelines.ingest import load_tables
from pipelines.workspace import Workspace
from promptenv.calibration import workspace_calibration
from promptenv.editing import EditCase, UnknownEditError, apply_edit, build_cases, edit_ids
from promptenv.encounters import references
from promptenv.env import AnswerReward
from promptenv.llm import LLMClient
from promptenv.llm.budget import Budget
from promptenv.paired import cluster_bootstrap_ci
from promptenv.policy import PolicySettings, pick_episodes
from promptenv.prompts import PromptConfig, fixed_config
from promptenv.reward_model import CoverageProxy
from promptenv.search import PerPatientSearch, known_plans
from promptenv.steps import WorkspaceSignals

DEFAULT_EDITS = "add self;add self,fewer self,fewer self;add style"


def edited(config: PromptConfig, labels: str) -> PromptConfig:
    """``config`` after the comma-separated edits ``labels`` (``add self,fewer self``)."""
    try:
        actions = edit_ids([part.strip() for part in labels.split(",")])
    except UnknownEditError as exc:
        raise SystemExit(str(exc)) from None
    for action in actions:
        config = apply_edit(config, action)
    return config


def _item_sets(case: EditCase) -> list[set[str]]:
    """The item sets of the patient's plans known at the index time, oldest first."""
    items = case.context.plan_items.groupby("encounter_id")["display"].apply(set)
    return [items.get(e, set()) for e in known_plans(case)["encounter_id"]]


def history_features(
    cases: list[EditCase],
    candidates: dict[str, PromptConfig],
    proxy: Callable[[EditCase, PromptConfig], float],
) -> np.ndarray:
    """Per case, what her earlier plans say (index time only; the next plan is not read):
    has a plan, number of plans, how much of the last plan repeats the one before
    (Jaccard) and, per candidate, the recall of the last plan by the prompt's own text
    (the coverage proxy against the last plan instead of the next one), and that recall
    minus peer's."""
    last = PerPatientSearch(1, target="last_plan")
    rows = []
    for case in cases:
        sets = _item_sets(case)
        scored = last.scored_case(case)
        cover = [proxy(scored, cfg) if scored else 0.0 for cfg in candidates.values()]
        jaccard = (
            len(sets[-1] & sets[-2]) / max(1, len(sets[-1] | sets[-2])) if len(sets) > 1 else 0.0
        )
        rows.append(
            [float(bool(sets)), min(1.0, len(sets) / 10), jaccard, *cover]
            + [c - cover[0] for c in cover[1:]]
        )
    return np.asarray(rows, dtype=np.float32)


def loo_predicted_gain(features: np.ndarray, gain: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """Per encounter: the gain a model fitted on the OTHER patients' encounters predicts."""
    predicted = np.zeros(len(gain))
    for patient in np.unique(patients):
        out = patients == patient
        model = ExtraTreesRegressor(64, min_samples_leaf=3, random_state=0)
        predicted[out] = model.fit(features[~out], gain[~out]).predict(features[out])
    return predicted


def choice_gain(predicted: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Per encounter: ``gain`` where ``predicted`` is > 0, else 0 (the encounter keeps peer)."""
    return np.where(predicted > 0, gain, 0.0)


def loo_choice_gain(features: np.ndarray, gain: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """Per encounter: ``gain`` where a model fitted on the other patients predicts a gain > 0,
    else 0 (the encounter keeps peer)."""
    return choice_gain(loo_predicted_gain(features, gain, patients), gain)


def best_choice_gain(predicted: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Per encounter (rows), the gain of the candidate (columns) with the highest predicted
    gain when that prediction is > 0, else 0 (peer)."""
    best = predicted.argmax(axis=1)
    rows = np.arange(len(best))
    return np.where(predicted[rows, best] > 0, gains[rows, best], 0.0)


def power(
    gain: np.ndarray, patients: np.ndarray, n_patients: int, draws: int, reps: int
) -> tuple[float, float]:
    """(mean gain, share of draws of ``n_patients`` patients whose interval is above 0)."""
    rng = np.random.default_rng(0)
    pool = np.unique(patients)
    above = 0
    for i in range(draws):
        keep = np.isin(patients, rng.choice(pool, size=min(n_patients, len(pool)), replace=False))
        above += cluster_bootstrap_ci(gain[keep], patients[keep], reps, i)[0] > 0
    return float(gain.mean()), above / draws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--workspace", required=True)
    parser.add_argument("--backend", default="local")
    parser.add_argument("--n-train", type=int, default=240)
    parser.add_argument("--n-validation", type=int, default=16)
    parser.add_argument("--edits", default=DEFAULT_EDITS, help="candidates, ';'-separated")
    parser.add_argument("--reps", type=int, default=4000, help="bootstrap resamples")
    parser.add_argument(
        "--max-calls", type=int, default=None, help="new LLM calls at most (default: no limit)"
    )
    parser.add_argument("--power-patients", type=int, default=0, help="test split size")
    parser.add_argument("--power-draws", type=int, default=400)
    args = parser.parse_args()

    peer = fixed_config("peer")
    candidates = {"peer": peer} | {e: edited(peer, e) for e in args.edits.split(";")}
    started = time.perf_counter()
    ws = Workspace.at(args.workspace)
    client = LLMClient(args.backend, workspace=ws, budget=Budget(max_calls=args.max_calls))
    tables = load_tables(ws)
    settings = PolicySettings(n_train=args.n_train, n_validation=args.n_validation)
    calibration = workspace_calibration(
        ws, client, tables, settings.n_calibration, params=settings.params, progress=print
    )
    rows = pd.concat(pick_episodes(tables["index_encounters"], settings))
    store = ContextStore(dict(tables), only_encounters=list(rows["encounter_id"]))
    cases = build_cases(tables, rows, WorkspaceSignals(ws), references(tables, rows), store)
    reward = AnswerReward(client, calibration.scorer(), settings.params)
    scores = {
        name: reward.answer_many([(c, cfg) for c in cases]) for name, cfg in candidates.items()
    }
    patients = np.array([str(c.context.patient["patient_id"]) for c in cases], dtype=object)
    obstetric = np.array([c.is_obstetric for c in cases])
    features = np.stack([c.features for c in cases])
    with_history = np.hstack(
        [features, history_features(cases, candidates, CoverageProxy(calibration.scorer()))]
    )
    print(
        f"{len(cases)} train + validation encounters of {len(set(patients))} patients "
        f"({int(obstetric.sum())} obstetric), {reward.llm_calls} new LLM calls, "
        f"{time.perf_counter() - started:.0f} s, threshold {calibration.threshold}\n"
    )
    metric = {  # candidate → metric → per encounter
        name: {m: np.array([getattr(a.score, m) for a in got]) for m in ("recall", "reward")}
        for name, got in scores.items()
    }
    base = metric["peer"]
    print(
        "| subset | candidate (edits of peer) | n | recall | recall − peer [95% CI, patients] "
        "| reward − peer | better / worse / equal | chosen by features (leave one patient out): "
        "recall − peer | the same, with plan history |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    powers: list[tuple[str, str, float, float]] = []
    for subset, mask in (("all", np.ones(len(cases), bool)), ("obstetric", obstetric),
                         ("adult", ~obstetric)):  # fmt: skip
        gains, predicted = [], []  # per candidate: recall − peer, its predicted gain
        for name in list(candidates)[1:]:
            got = metric[name]
            d = {m: (got[m] - base[m])[mask] for m in base}
            ci = {m: cluster_bootstrap_ci(d[m], patients[mask], args.reps, 0) for m in base}
            gains.append(d["recall"])
            predicted.append(loo_predicted_gain(features[mask], d["recall"], patients[mask]))
            chosen = choice_gain(predicted[-1], d["recall"])
            cci = cluster_bootstrap_ci(chosen, patients[mask], args.reps, 0)
            hist = loo_choice_gain(with_history[mask], d["recall"], patients[mask])
            hci = cluster_bootstrap_ci(hist, patients[mask], args.reps, 0)
            better, worse = float((d["recall"] > 0).mean()), float((d["recall"] < 0).mean())
            print(
                f"| {subset} | {name} | {int(mask.sum())} | {got['recall'][mask].mean():.3f} "
                f"| {d['recall'].mean():+.3f} [{ci['recall'][0]:+.3f}, {ci['recall'][1]:+.3f}] "
                f"| {d['reward'].mean():+.3f} [{ci['reward'][0]:+.3f}, {ci['reward'][1]:+.3f}] "
                f"| {better:.0%} / {worse:.0%} / {1 - better - worse:.0%} "
                f"| {chosen.mean():+.3f} [{cci[0]:+.3f}, {cci[1]:+.3f}] "
                f"| {hist.mean():+.3f} [{hci[0]:+.3f}, {hci[1]:+.3f}] |"
            )
            if args.power_patients:
                powers.append((subset, name, *power(
                    chosen, patients[mask], args.power_patients, args.power_draws, 1000
                )))  # fmt: skip
        if len(candidates) > 2:  # the choice among all candidates (and peer) per encounter
            best = best_choice_gain(np.stack(predicted, 1), np.stack(gains, 1))
            bci = cluster_bootstrap_ci(best, patients[mask], args.reps, 0)
            print(
                f"| {subset} | the best of them by features | {int(mask.sum())} | | | | | "
                f"{best.mean():+.3f} [{bci[0]:+.3f}, {bci[1]:+.3f}] | |"
            )
    print(f"\npeer: recall {base['recall'].mean():.3f}, reward {base['reward'].mean():.3f}")
    for subset, name, gain, share in powers:
        print(
            f"{subset}, {name} chosen by features: gain {gain:+.3f}; its interval over "
            f"{args.power_patients} patients lies above 0 in {share:.0%} of "
            f"{args.power_draws} draws"
        )


if __name__ == "__main__":
    main()
