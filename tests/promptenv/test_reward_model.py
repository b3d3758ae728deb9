"""The learned reward model and the budgeted loop that trains PPO mostly against it.

The LLM is `EchoBackend` (answers with the prompt's bullet lines): rewards are
reproducible and move with the edits, and every call it receives is counted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from echo_llm import EchoBackend, history_signals
from scipy.stats import spearmanr

from promptenv.calibration import calibrated_scorer
from promptenv.editing import EDITS, apply_edit, build_cases, edit_ids, edit_mask
from promptenv.llm import LLMClient
from promptenv.policy import (
    PolicySettings,
    TrainedPolicy,
    load_policy,
    pick_training_encounters,
    train_policy,
)
from promptenv.prompts import INITIAL_CONFIG, PromptConfig, assemble
from promptenv.reward import PlanScorer
from promptenv.reward_model import (
    CoverageProxy,
    ModelReward,
    RewardModel,
    ScoredAnswers,
    model_features,
    out_of_fold_gains,
    patient_of,
)

pytestmark = pytest.mark.slow  # PPO rounds with the echo LLM: about half a minute

#: A few PPO steps in 2 rounds against the reward model, on 8 training encounters.
SMALL = PolicySettings(
    n_train=8,
    n_validation=4,
    n_steps=64,
    batch_size=32,
    n_epochs=2,
    n_calibration=4,
    max_llm_calls=90,
    reward_model=True,
    model_rounds=2,
    model_timesteps=128,
)


def _train(
    tables: dict[str, pd.DataFrame], workspace: Path, settings: PolicySettings
) -> tuple[TrainedPolicy, int]:
    """Calibrate on 4 validation encounters with the echo LLM, then train with ``settings``:
    the result and the answers training (not the calibration) asked the backend for."""
    backend = EchoBackend()
    client = LLMClient(backend, workspace=workspace)
    _, calibration = calibrated_scorer(client, tables, 4)
    before = backend.calls
    result = train_policy(
        client,
        tables,
        history_signals(tables),  # type: ignore[arg-type]
        workspace / "policy",
        settings,
        calibration=calibration,
    )
    return result, backend.calls - before


def _random_configs(rng: np.random.Generator, n: int) -> list[PromptConfig]:
    out = []
    for _ in range(n):
        config = INITIAL_CONFIG
        for _ in range(int(rng.integers(0, 5))):
            valid = np.flatnonzero(edit_mask(config))
            action = int(rng.choice(valid))
            if EDITS[action].kind != "stop":
                config = apply_edit(config, action)
        out.append(config)
    return out


def test_the_reward_model_ranks_held_out_prompts_like_their_true_reward(
    default_tables: dict[str, pd.DataFrame],
) -> None:
    """A reward that needs no LLM (how many words the prompt spends on each patient, which
    depends on the patient and the config together) is learned from 300 pairs well enough to
    rank 200 other pairs, of other patients, by it."""
    idx = default_tables["index_encounters"]
    rows = pick_training_encounters(idx, "train", 40, 0.5, 2, 0)
    cases = build_cases(default_tables, rows, history_signals(default_tables))  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    pairs = [(cases[int(rng.integers(len(cases)))], c) for c in _random_configs(rng, 500)]
    proxy = CoverageProxy(PlanScorer(threshold=0.5))

    def words(case, config):  # type: ignore[no-untyped-def]
        return len(assemble(case.context, case.signals, config).system.split()) / 300

    train_ids = {c.encounter_id for c in cases[:28]}
    fit = [p for p in pairs if p[0].encounter_id in train_ids][:300]
    held = [p for p in pairs if p[0].encounter_id not in train_ids][:200]
    assert len(fit) >= 250 and len(held) >= 100

    def x(ps):  # type: ignore[no-untyped-def]
        return np.stack(
            [model_features(c, cfg, p, 6) for (c, cfg), p in zip(ps, proxy.many(ps), strict=True)]
        )

    model = RewardModel(seed=0).fit(x(fit), np.asarray([words(c, cfg) for c, cfg in fit]))
    mean, spread = model.predict(x(held))
    truth = [words(c, cfg) for c, cfg in held]
    assert spearmanr(mean, truth).statistic > 0.8
    assert spread.shape == mean.shape and (spread >= 0).all() and spread.max() > 0


def _cases(tables: dict[str, pd.DataFrame], n: int) -> list:  # type: ignore[type-arg]
    rows = pick_training_encounters(tables["index_encounters"], "train", n, 0.5, 2, 0)
    return build_cases(tables, rows, history_signals(tables))  # type: ignore[arg-type]


class _Answers:
    """What `ScoredAnswers.add` needs of an `AnswerReward`: scores from a function, no LLM."""

    def __init__(self, fn):  # type: ignore[no-untyped-def]
        self.fn = fn

    def is_answered(self, case, config):  # type: ignore[no-untyped-def]
        return True

    def answer_many(self, pairs, progress=None):  # type: ignore[no-untyped-def]
        from types import SimpleNamespace

        return [SimpleNamespace(score=SimpleNamespace(reward=self.fn(c, cfg))) for c, cfg in pairs]


def test_the_gain_target_predicts_an_edit_s_gain_whatever_the_patient_s_own_level(
    default_tables: dict[str, pd.DataFrame],
) -> None:
    """Rewards = a level of the patient's own, which no feature predicts, plus what the config
    adds. Trained on every patient's start and on each of three edits for about half of the
    patients, the shaped reward PPO sees for a pair not scored (its reward minus the start's)
    is the edit's gain with the "gain" target, and is thrown off by the patient's level with
    the "reward" target (the model before 2026-12-05)."""
    from promptenv.prompts import fixed_config

    cases = _cases(default_tables, 40)
    rng = np.random.default_rng(1)
    level = {c.encounter_id: float(rng.uniform(0, 1)) for c in cases}
    start = fixed_config("peer")
    configs = [start, *(apply_edit(start, a) for a in np.flatnonzero(edit_mask(start))[1:4])]

    def effect(config: PromptConfig) -> float:
        return 0.1 * len(config.fragments) + 0.05 * int("self" in config.fragments)

    def true(case, config):  # type: ignore[no-untyped-def]
        return level[case.encounter_id] + effect(config)

    proxy = CoverageProxy(PlanScorer(threshold=0.5))
    # every patient's start is scored, and each edit for about half of the patients
    scored = [(c, start) for c in cases] + [
        (c, cfg) for c in cases for cfg in configs[1:] if rng.uniform() < 0.5
    ]
    unscored = [(c, cfg) for c in cases for cfg in configs[1:] if (c, cfg) not in scored]
    errors = {}
    for target in ("gain", "reward"):
        data = ScoredAnswers(start=start)
        data.add(_Answers(true), proxy, scored, 6, 0, lambda _m: None, "seed")  # type: ignore[arg-type]
        model = ModelReward(
            data.known, data.fit(0, target), proxy, 6, start if target == "gain" else None
        )
        errors[target] = np.mean(
            [
                abs(model(c, cfg) - model(c, start) - (effect(cfg) - effect(start)))
                for c, cfg in unscored
            ]
        )
    assert len(unscored) > 40
    assert errors["gain"] < 0.01  # measured: 0.000
    assert errors["reward"] > 0.04  # measured: 0.082


@pytest.mark.parametrize("room", [0, 1000])
def test_out_of_fold_policies_never_learn_from_the_patients_they_are_scored_on(
    default_tables: dict[str, pd.DataFrame],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    room: int,
) -> None:
    """Each fold's reward model leaves out exactly its own patients' encounters, the folds
    split patients, not encounters, every training encounter is scored once, and the check
    never asks the LLM for more than ``room`` answers (it says it is skipped instead)."""
    from promptenv.env import AnswerReward
    from promptenv.policy_info import StartConfig
    from promptenv.prompts import fixed_config

    backend = EchoBackend()
    client = LLMClient(backend, workspace=tmp_path / "ws")
    scorer, _ = calibrated_scorer(client, default_tables, 4)
    cases = _cases(default_tables, 16)
    settings = PolicySettings(n_steps=32, batch_size=32, n_epochs=1, folds=3)
    reward = AnswerReward(client, scorer, settings.params)
    start = StartConfig("peer", fixed_config("peer"))
    proxy = CoverageProxy(scorer)
    data = ScoredAnswers(start=start.config)
    seed = [(c, cfg) for c in cases for cfg in (start.config, INITIAL_CONFIG)]
    data.add(reward, proxy, seed, 6, 1000, lambda _m: None, "seed")
    left_out: list[frozenset[str]] = []
    fit = ScoredAnswers.fit

    def spy(self, seed, target="gain", leave_out=frozenset()):  # type: ignore[no-untyped-def]
        left_out.append(leave_out)
        return fit(self, seed, target, leave_out)

    monkeypatch.setattr(ScoredAnswers, "fit", spy)
    said: list[str] = []
    before = backend.calls
    got = out_of_fold_gains(cases, data, proxy, reward, start, settings, 64, room, said.append)
    assert backend.calls - before <= room
    assert len(left_out) == 3 and sum(map(len, left_out)) == len(cases)
    assert frozenset().union(*left_out) == {c.encounter_id for c in cases}
    fold_of = {
        c.encounter_id: i
        for i, fold in enumerate(left_out)
        for c in cases
        if c.encounter_id in fold
    }
    for c in cases:  # a patient's encounters are in one fold
        assert {fold_of[o.encounter_id] for o in cases if patient_of(o) == patient_of(c)} == {
            fold_of[c.encounter_id]
        }
    if got is None:
        assert room == 0 and "skipped" in said[-1]
    else:
        assert len(got.gains) == len(cases) and np.isfinite(got.gains).all()
        assert sorted(got.encounters) == sorted(c.encounter_id for c in cases)
        by_id = {c.encounter_id: c for c in cases}
        assert list(got.patients) == [patient_of(by_id[e]) for e in got.encounters]
        # the folds come one after another, and a kept start config gains exactly nothing
        folds = [fold_of[e] for e in got.encounters]
        assert folds == sorted(folds)
        assert all(g == 0.0 for g, edited in zip(got.gains, got.edited, strict=True) if not edited)


@pytest.mark.parametrize("budget", [45, 90])
def test_the_reward_model_loop_never_spends_more_than_its_llm_budget(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path, budget: int
) -> None:
    """Counted at the backend, after calibration: every answer training asked for, the
    initial prompts', the fixed prompts', the rounds' and the validations' included."""
    settings = dataclasses.replace(
        SMALL, n_train=16, n_epochs=4, max_llm_calls=budget, model_rounds=4
    )
    result, spent = _train(default_tables, tmp_path / "ws", settings)
    training = result.policy.info.training
    assert spent <= budget
    assert training.llm_calls == spent  # the log counts what reached the backend
    # the rounds ran and were validated; a tight budget stops the loop early, saying so
    assert training.timesteps >= settings.model_timesteps
    assert 1 <= len(training.validation_curve) <= settings.model_rounds
    if budget == 45:
        assert training.stopped_by_budget and len(training.validation_curve) < 4
    else:
        assert spent > 45  # a larger budget is used, between the rounds
    # the saved policy loads and edits like the trained one
    assert load_policy(result.path).info.settings.reward_model


def test_the_reward_model_loop_is_reproducible(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    """Two trainings with the same settings, each with its own (empty) answer cache, give the
    same validation curve and the same weights."""
    import torch

    settings = SMALL
    runs = [_train(default_tables, tmp_path / name, settings)[0].policy for name in ("a", "b")]
    first, second = (p.info.training.validation_curve for p in runs)
    assert first == second
    weights = [p.model.policy.state_dict() for p in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_restricted_edit_space_seeds_the_start_s_neighbours_and_trains_within_it(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    """With ``edits``, the seed is what one allowed edit makes of the start (not the fixed
    prompts outside the space), and the trained policy edits only within the space."""
    from promptenv.prompts import fixed_config
    from promptenv.reward_model import one_edit_neighbours

    peer = fixed_config("peer")
    assert one_edit_neighbours(peer, ()) == []  # every edit: too many to seed
    assert one_edit_neighbours(peer, ("add self", "fewer self")) == [
        apply_edit(peer, edit_ids(("add self",))[0])
    ]  # fewer self needs the self list in
    settings = dataclasses.replace(
        SMALL,
        max_llm_calls=200,
        keep_best=False,  # no fall-back: the edits are the network's
        edits=("add self", "fewer self"),
    )
    result, _ = _train(default_tables, tmp_path / "ws", settings)
    loaded = load_policy(result.path)
    assert loaded.allowed_edits == settings.edits
    idx = default_tables["index_encounters"]
    rows = pick_training_encounters(idx, "train", 30, 0.5, 2, 1)
    cases = build_cases(default_tables, rows, history_signals(default_tables))  # type: ignore[arg-type]
    for policy in (result.policy, loaded):
        for deterministic in (True, False):
            for _, trace in policy.edit_many(cases, deterministic):
                assert set(trace) <= set(settings.edits)
