"""The learned reward model and the budgeted loop that trains PPO mostly against it.

The LLM is `EchoBackend` (answers with the prompt's bullet lines): rewards are
reproducible and move with the edits, and every call it receives is counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from echo_llm import EchoBackend, history_signals
from scipy.stats import spearmanr

from promptenv.calibration import calibrated_scorer
from promptenv.editing import EDITS, apply_edit, build_cases, edit_mask
from promptenv.llm import LLMClient
from promptenv.policy import PolicySettings, load_policy, pick_training_encounters, train_policy
from promptenv.prompts import INITIAL_CONFIG, PromptConfig, assemble
from promptenv.reward import PlanScorer
from promptenv.reward_model import CoverageProxy, RewardModel, model_features

pytestmark = pytest.mark.slow  # PPO rounds with the echo LLM: about half a minute


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


@pytest.mark.parametrize("budget", [45, 90])
def test_the_reward_model_loop_never_spends_more_than_its_llm_budget(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path, budget: int
) -> None:
    """Counted at the backend, after calibration: every answer training asked for, the
    initial prompts', the fixed prompts', the rounds' and the validations' included."""
    backend = EchoBackend()
    client = LLMClient(backend, workspace=tmp_path / "ws")
    _, calibration = calibrated_scorer(client, default_tables, 4)
    before = backend.calls
    settings = PolicySettings(
        n_train=16,
        n_validation=4,
        n_steps=64,
        batch_size=32,
        n_epochs=4,
        n_calibration=4,
        max_llm_calls=budget,
        reward_model=True,
        model_rounds=4,
        model_timesteps=128,
    )
    result = train_policy(
        client,
        default_tables,
        history_signals(default_tables),  # type: ignore[arg-type]
        tmp_path / "policy",
        settings,
        calibration=calibration,
    )
    spent = backend.calls - before
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
    assert load_policy(tmp_path / "policy").info.settings.reward_model


def test_the_reward_model_loop_is_reproducible(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    """Two trainings with the same settings, each with its own (empty) answer cache, give the
    same validation curve and the same weights."""
    import torch

    settings = PolicySettings(
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
    runs = []
    for name in ("first", "second"):
        client = LLMClient(EchoBackend(), workspace=tmp_path / name)
        _, calibration = calibrated_scorer(client, default_tables, 4)
        result = train_policy(
            client,
            default_tables,
            history_signals(default_tables),  # type: ignore[arg-type]
            tmp_path / name / "policy",
            settings,
            calibration=calibration,
        )
        runs.append(result.policy)
    first, second = (p.info.training.validation_curve for p in runs)
    assert first == second
    weights = [p.model.policy.state_dict() for p in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
