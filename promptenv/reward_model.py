"""A learned reward model, and PPO that trains mostly against it (Dyna-style, budgeted).

Every scored answer on a TRAINING encounter is a data point: (patient features,
prompt config) → reward. `RewardModel` fits them; `learn_with_reward_model`
lets MaskablePPO train against the model for many steps at no LLM cost, and
spends LLM calls in an explicit loop, only on configs the policy is heading to
or where the model is unsure.

The model
    scikit-learn's `ExtraTreesRegressor` on the patient's observation features
    (`promptenv.editing.case_features`), the config's features
    (`promptenv.editing.config_features`) and an LLM-free proxy. Why trees: a few
    hundred points, features of mixed scale, rewards that hinge on interactions
    (peers help the patients whose peers are like them), and the spread of the
    trees' predictions is a usable measure of how unsure the model is (used to
    choose where to ask the LLM). It fits in milliseconds.
    It learns a config's gain over the start config on the same encounter
    (``PolicySettings.model_target`` ``"gain"``), so that a patient's own reward
    level, which no feature shows, does not enter the predicted gain of an edit
    (`ModelReward`); ``"reward"`` learns the reward itself.

The proxy (`coverage_proxy`)
    How well the prompt's own text covers the physician's next plan: the
    prompt is scored with the same `PlanScorer` as an answer would be. A small
    model answers mostly from the lists it is shown, so this predicts much of
    the reward before any LLM call. It reads the plan, so it exists only for
    training encounters, and only the reward model sees it: the policy's
    observation never does.

The loop (`learn_with_reward_model`), with ``B`` = ``settings.max_llm_calls``
    1. seed: the LLM answers each training encounter's start config, then its other
       fixed prompts (`promptenv.prompts.CONFIG_METHODS`; the initial ones are answered
       already); in a restricted edit space (``settings.edits``) the start's one-edit
       neighbours in it instead of the fixed prompts (what the first policy can reach,
       which no fixed prompt shows the model);
    2. each of ``settings.model_rounds`` rounds:
       a. fit the model on every scored training answer;
       b. PPO for ``settings.model_timesteps`` steps against the model (a
          scored pair's reward is its LLM reward, the others the model's);
       c. validate the deterministic policy on VALIDATION encounters with the
          LLM (the keep-best rule of `promptenv.policy` chooses among rounds);
       d. ask the LLM for this round's share of what is left of ``B``: first
          the configs the deterministic policy picks on training encounters,
          then those of sampled rollouts, the most uncertain first.
    3. with ``settings.folds`` > 1, the out-of-fold check (`out_of_fold_gains`): per fold of training
       patients, a fresh PPO run against a model fitted without the fold, scored on it
       with the LLM; `promptenv.policy.keep_checkpoint` decides the fall-back on
       these gains pooled with the validation ones.
    Every LLM call goes through the same `AnswerReward` (cache, ledger, budget);
    the loop checks what is left before each batch and never asks for more (the
    rounds keep back what the next validation and the out-of-fold check cost),
    so it never spends more than ``B`` new answers in all (seed and validation
    included), provided what every training spends first (the answers to the
    initial prompts and to the fixed prompts on validation, `promptenv.policy`)
    leaves at least one answer per validation encounter for the first validation.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from stable_baselines3.common.callbacks import BaseCallback

from promptenv.editing import (
    STOP,
    EditCase,
    allowed_mask,
    apply_edit,
    config_features,
    edit_mask,
)
from promptenv.env import AnswerReward, PromptEditEnv
from promptenv.llm.client import progress_lines
from promptenv.policy_callbacks import TrainingLog
from promptenv.policy_info import PolicySettings, StartConfig, ValidationPoint
from promptenv.prompts import CONFIG_METHODS, INITIAL_CONFIG, PromptConfig, assemble, fixed_config
from promptenv.reward import PlanScorer
from recsys.type_aliases import Progress, Tick

Key = tuple[str, str]  # (encounter id, the config's canonical JSON)


def _config_json(config: PromptConfig) -> str:
    return json.dumps(config.as_dict(), sort_keys=True)


def config_key(case: EditCase, config: PromptConfig) -> Key:
    return case.encounter_id, _config_json(config)


def patient_of(case: EditCase) -> str:
    return str(case.context.patient["patient_id"])


class CoverageProxy:
    """The LLM-free proxy: the `PlanScorer` reward of the prompt's own text, memoized."""

    def __init__(self, scorer: PlanScorer) -> None:
        self.scorer = scorer
        self._memo: dict[Key, float] = {}

    def __call__(self, case: EditCase, config: PromptConfig) -> float:
        return self.many([(case, config)])[0]

    def many(self, pairs: Sequence[tuple[EditCase, PromptConfig]]) -> list[float]:
        keys = [config_key(c, cfg) for c, cfg in pairs]
        todo = [i for i, k in enumerate(keys) if k not in self._memo]
        if todo:
            prompts = [
                assemble(pairs[i][0].context, pairs[i][0].signals, pairs[i][1]) for i in todo
            ]
            scores = self.scorer.score_many(
                [f"{p.system}\n{p.user}" for p in prompts],
                [list(pairs[i][0].reference_items) for i in todo],
                [pairs[i][0].plan_text for i in todo],
            )
            for i, score in zip(todo, scores, strict=True):
                self._memo[keys[i]] = score.recall
        return [self._memo[k] for k in keys]


def model_features(
    case: EditCase, config: PromptConfig, proxy: float, max_edits: int
) -> NDArray[np.float32]:
    """The reward model's input: patient features, config features (no edit count), proxy."""
    cfg = config_features(config, 0, max_edits)[:-1]
    return np.concatenate([case.features, cfg, [proxy]]).astype(np.float32)


@dataclass
class RewardModel:
    """Extra trees on (patient, config, proxy) → reward; ``spread`` is the trees' sd."""

    seed: int = 0
    n_estimators: int = 64
    min_samples_leaf: int = 2
    _trees: Any = field(default=None, repr=False)

    def fit(self, x: NDArray[np.float32], y: NDArray[np.float64]) -> RewardModel:
        from sklearn.ensemble import ExtraTreesRegressor

        self._trees = ExtraTreesRegressor(
            n_estimators=self.n_estimators,
            min_samples_leaf=self.min_samples_leaf,
            random_state=self.seed,
            n_jobs=1,
        ).fit(x, y)
        return self

    def predict(self, x: NDArray[np.float32]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Mean and sd over the trees of the predicted reward of each row of ``x``."""
        if self._trees is None:
            raise RuntimeError("the reward model is not fitted")
        per_tree = np.stack([t.predict(x) for t in self._trees.estimators_])
        return per_tree.mean(axis=0), per_tree.std(axis=0)


class ModelReward:
    """A `promptenv.env.RewardFn` for training encounters: the LLM's reward where an answer was
    scored, else the reward model's prediction. Counts the pairs it predicted.

    A model fitted on the ``"gain"`` target predicts a config's gain over ``start``: its
    reward is then the start config's LLM reward for the encounter plus that gain, so the
    environment's shaped reward (minus the start config's) is the predicted gain itself,
    free of how far this patient's own reward lies from the model's average.

    ``pessimism`` > 0 takes that many of the trees' sds off a predicted reward (a lower
    confidence bound): PPO then prefers what the LLM scored, or what the model is sure
    of, to where the model's errors happen to be high. ``smooth``: every pair but the start
    config's gets the model's prediction, scored or not, so that PPO learns from what the
    model generalizes rather than from each training encounter's own noisy answers."""

    def __init__(
        self,
        known: dict[Key, float],
        model: RewardModel,
        proxy: CoverageProxy,
        max_edits: int,
        start: PromptConfig | None = None,
        pessimism: float = 0.0,
        smooth: bool = False,
    ) -> None:
        self.known, self.model, self.proxy, self.max_edits = known, model, proxy, max_edits
        self.start, self.pessimism, self.smooth = start, pessimism, smooth
        self._memo: dict[Key, float] = {}
        self.predicted = 0

    @classmethod
    def of(
        cls,
        known: dict[Key, float],
        model: RewardModel,
        proxy: CoverageProxy,
        settings: PolicySettings,
        start: PromptConfig,
    ) -> ModelReward:
        """The reward PPO trains against with ``settings`` (target, pessimism, smoothing)."""
        return cls(
            known,
            model,
            proxy,
            settings.max_edits,
            start if settings.model_target == "gain" else None,
            settings.model_pessimism,
            settings.model_smooth,
        )

    def __call__(self, case: EditCase, config: PromptConfig) -> float:
        key = config_key(case, config)
        if key in self.known and (not self.smooth or config == self.start):
            return self.known[key]
        if key not in self._memo:
            x = model_features(case, config, self.proxy(case, config), self.max_edits)
            mean, spread = self.model.predict(x[None, :])
            base = 0.0 if self.start is None else self.known.get(config_key(case, self.start), 0.0)
            self._memo[key] = base + float(mean[0]) - self.pessimism * float(spread[0])
            self.predicted += 1
        return self._memo[key]


@dataclass
class ScoredAnswers:
    """The LLM-scored training answers: the reward model's data. ``start`` is the config
    episodes start from: the model's ``"gain"`` target is a pair's reward minus the start
    config's reward for the same encounter."""

    start: PromptConfig = INITIAL_CONFIG
    known: dict[Key, float] = field(default_factory=dict)
    rows: list[NDArray[np.float32]] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    encounters: list[str] = field(default_factory=list)

    def add(
        self,
        reward: AnswerReward,
        proxy: CoverageProxy,
        pairs: Sequence[tuple[EditCase, PromptConfig]],
        max_edits: int,
        room: int,
        progress: Progress,
        what: str,
    ) -> None:
        """Answer and record the pairs not scored yet, at most ``room`` of them new to the
        reward's memory (a pair answered before, in memory, is free and always taken)."""
        chosen: dict[Key, tuple[EditCase, PromptConfig]] = {}
        new = 0
        for case, config in pairs:
            key = config_key(case, config)
            if key in self.known or key in chosen:
                continue
            if not reward.is_answered(case, config):
                if new >= room:
                    continue
                new += 1
            chosen[key] = (case, config)
        if not chosen:
            return
        fresh = list(chosen.values())
        answered = reward.answer_many(fresh, progress=progress_lines(progress, what))
        for (case, config), a, p in zip(fresh, answered, proxy.many(fresh), strict=True):
            self.known[config_key(case, config)] = a.score.reward
            self.rows.append(model_features(case, config, p, max_edits))
            self.targets.append(a.score.reward)
            self.encounters.append(case.encounter_id)

    def start_reward(self, encounter_id: str) -> float | None:
        """The LLM reward of the start config on this encounter (None: not scored)."""
        return self.known.get((encounter_id, _config_json(self.start)))

    def fit(
        self, seed: int, target: str = "gain", leave_out: frozenset[str] = frozenset()
    ) -> RewardModel:
        """The reward model on every scored answer but those of the ``leave_out`` encounters.

        ``target`` ``"gain"`` (the default): each answer's reward minus the start config's on
        the same encounter, on the encounters whose start config was scored; ``"reward"``:
        the reward itself (what the model fitted before 2026-12-05)."""
        keep = [i for i, e in enumerate(self.encounters) if e not in leave_out]
        if target == "gain":
            base = {e: self.start_reward(e) for e in set(self.encounters)}
            keep = [i for i in keep if base[self.encounters[i]] is not None]
            y = [self.targets[i] - (base[self.encounters[i]] or 0.0) for i in keep]
        else:
            y = [self.targets[i] for i in keep]
        if not keep:
            raise ValueError(
                "the reward model has no scored training answer to learn from (the LLM budget "
                "left none for the start prompt on training encounters): raise --max-llm-calls"
            )
        return RewardModel(seed=seed).fit(np.stack([self.rows[i] for i in keep]), np.asarray(y))


def one_edit_neighbours(config: PromptConfig, edits: Sequence[str]) -> list[PromptConfig]:
    """The configs one edit of a restricted edit space (``edits``, by label) makes of
    ``config``; none when the space is not restricted (every edit: too many to seed)."""
    allowed = allowed_mask(edits)
    if allowed is None:
        return []
    return [
        apply_edit(config, int(a)) for a in np.flatnonzero(edit_mask(config) & allowed) if a != STOP
    ]


def policy_configs(
    model: Any,
    cases: Sequence[EditCase],
    start: PromptConfig,
    max_edits: int,
    edits: Sequence[str] = (),
    deterministic: bool = True,
) -> list[PromptConfig]:
    """The config the policy ends at for each case (sampled when not ``deterministic``),
    within ``edits`` (by label; empty: every edit): `promptenv.policy.Policy.edit` on the
    model being trained."""
    from promptenv.policy import policy_in_training

    policy = policy_in_training(model, start, max_edits, edits)
    return [config for config, _ in policy.edit_many(cases, deterministic)]


def _uncertain_first(
    pairs: Sequence[tuple[EditCase, PromptConfig]],
    data: ScoredAnswers,
    proxy: CoverageProxy,
    fitted: RewardModel,
    max_edits: int,
) -> list[tuple[EditCase, PromptConfig]]:
    """The pairs not scored yet, once each, the model's most uncertain first."""
    unique = list(
        {
            config_key(c, cfg): (c, cfg) for c, cfg in pairs if config_key(c, cfg) not in data.known
        }.values()
    )
    if not unique:
        return []
    x = np.stack(
        [
            model_features(c, cfg, p, max_edits)
            for (c, cfg), p in zip(unique, proxy.many(unique), strict=True)
        ]
    )
    _, spread = fitted.predict(x)
    return [unique[i] for i in np.argsort(-spread, kind="stable")]


def validate(
    model: Any, eval_env: PromptEditEnv, reward: AnswerReward, timesteps: int, say: Progress
) -> ValidationPoint:
    """The deterministic policy's mean LLM reward over the start config on VALIDATION encounters
    (`promptenv.policy.validate_policy`), said with the LLM calls spent so far."""
    from promptenv.policy import validate_policy

    point = validate_policy(
        model, eval_env, reward, timesteps, progress_lines(say, "validation answers")
    )
    say(
        f"validation at {timesteps} steps: reward over the start prompt "
        f"{point.validation_reward:+.4f} ({reward.llm_calls} LLM calls so far)"
    )
    return point


class _Steps(BaseCallback):
    """Counts PPO steps and finished episodes of one `learn` call; ticks a bar."""

    def __init__(self, log: TrainingLog, base: int, total: int, tick: Tick | None) -> None:
        super().__init__()
        self.log, self.base, self.total, self.tick = log, base, total, tick
        self.steps = 0

    def _on_step(self) -> bool:
        self.steps += 1
        self.log.timesteps = self.base + self.steps
        self.log.episodes += int(np.sum(self.locals["dones"]))
        if self.tick is not None:
            self.tick(self.log.timesteps, self.total)
        return True


@dataclass(frozen=True)
class OutOfFold:
    """The out-of-fold check's held-out training encounters, in the folds' order: each one's
    LLM gain over the start config, patient, encounter id and whether its fold's policy
    edited it (did not keep the start config)."""

    gains: NDArray[np.float64]
    patients: NDArray[np.object_]
    encounters: tuple[str, ...]
    edited: NDArray[np.bool_]


def out_of_fold_gains(
    train_cases: Sequence[EditCase],
    data: ScoredAnswers,
    proxy: CoverageProxy,
    reward: AnswerReward,
    start: StartConfig,
    settings: PolicySettings,
    steps: int,
    room: int,
    say: Progress,
) -> OutOfFold | None:
    """The training run's gain over the start config on training patients it did not learn
    from: ``settings.folds`` folds of training patients (seeded); for each, a fresh PPO model
    learns ``steps`` steps against a reward model fitted without that fold's answers, on the
    other folds' encounters, then edits the fold's encounters deterministically, and the LLM
    scores what it chose (the start config's answers are there already).

    Returns each held-out encounter's LLM gain, patient and edit (`OutOfFold`), or None, said,
    when scoring
    them would take more than ``room`` new answers or a fold has no start answer to learn
    from. PPO against the model costs no LLM call; the answers go through ``reward``."""
    from promptenv.policy import make_model

    max_edits, k = settings.max_edits, settings.folds
    cases = [c for c in train_cases if data.start_reward(c.encounter_id) is not None]
    patients = sorted({patient_of(c) for c in cases})
    if len(patients) < k:
        say(f"out-of-fold check skipped: {len(patients)} training patients for {k} folds")
        return None
    order = np.random.default_rng(settings.seed).permutation(len(patients))
    chosen: list[tuple[EditCase, PromptConfig]] = []
    for f, fold in enumerate(np.array_split(order, k)):
        held = {patients[i] for i in fold}
        inside = [c for c in cases if patient_of(c) not in held]
        outside = [c for c in cases if patient_of(c) in held]
        leave_out = frozenset(c.encounter_id for c in outside)
        fitted = data.fit(settings.seed + f, settings.model_target, leave_out)
        known = {key: v for key, v in data.known.items() if key[0] not in leave_out}
        scored = ModelReward.of(known, fitted, proxy, settings, start.config)
        env = PromptEditEnv(
            inside, scored, max_edits=max_edits, edits=settings.edits, initial=start.config
        )
        fold_model = make_model(env, replace(settings, seed=settings.seed + f))
        fold_model.learn(total_timesteps=steps)
        configs = policy_configs(fold_model, outside, start.config, max_edits, settings.edits)
        chosen += zip(outside, configs, strict=True)
    new = sum(not reward.is_answered(c, cfg) for c, cfg in chosen)
    if new > room:
        say(
            f"out-of-fold check skipped: it needs {new} new LLM answers and the budget leaves "
            f"{room}; the fall-back is decided on validation patients alone"
        )
        return None
    answered = reward.answer_many(chosen, progress=progress_lines(say, "out-of-fold answers"))
    gains = np.array(
        [
            a.score.reward - (data.start_reward(c.encounter_id) or 0.0)
            for (c, _), a in zip(chosen, answered, strict=True)
        ],
        dtype=float,
    )
    return OutOfFold(
        gains,
        np.array([patient_of(c) for c, _ in chosen], dtype=object),
        tuple(c.encounter_id for c, _ in chosen),
        np.array([cfg != start.config for _, cfg in chosen]),
    )


def learn_with_reward_model(
    model: Any,
    train_cases: Sequence[EditCase],
    eval_env: PromptEditEnv,
    reward: AnswerReward,
    start: StartConfig,
    settings: PolicySettings,
    say: Progress,
    tick: Tick | None = None,
    data: ScoredAnswers | None = None,
) -> TrainingLog:
    """PPO against a reward model refitted each round, LLM calls within
    ``settings.max_llm_calls`` (see the module docstring). Validation points, the best
    validation weights and the out-of-fold gains (`out_of_fold_gains`, with
    ``settings.folds`` > 1) are in the returned log; the scored answers are in ``data`` when
    one is given (empty)."""
    log, budget = TrainingLog(), settings.max_llm_calls
    max_edits, edits = settings.max_edits, settings.edits
    proxy = CoverageProxy(reward.scorer)
    if data is None:
        data = ScoredAnswers()
    data.start = start.config
    rounds = max(1, settings.model_rounds)
    total = rounds * settings.model_timesteps
    folds = settings.folds > 1 and settings.keep_best and settings.require_interval
    # what the out-of-fold check may cost (one answer per training encounter) is kept back too
    reserve = len(eval_env.cases) + (len(train_cases) if folds else 0)

    def left() -> int:
        return max(0, budget - reward.llm_calls)

    def room(share: int, keep: int) -> int:
        return max(0, min(share, left() - keep))

    # the start config first: the "gain" target needs its answer on each encounter
    # in a restricted edit space, only what the policy can reach in one edit: the fixed
    # prompts outside it would spend the budget on configs it may never reach
    configs = [start.config, *one_edit_neighbours(start.config, edits)]
    if not edits:
        configs += [fixed_config(m) for m in CONFIG_METHODS if fixed_config(m) != start.config]
    seed = [(c, config) for config in configs for c in train_cases]
    # validating the first policy is kept back, not the out-of-fold check: the seed comes first
    data.add(
        reward,
        proxy,
        seed,
        max_edits,
        room(left(), len(eval_env.cases)),
        say,
        "start and its one-edit neighbours on training" if edits else "fixed prompts on training",
    )
    for r in range(rounds):
        fitted = data.fit(settings.seed + r, settings.model_target)
        scored = ModelReward.of(data.known, fitted, proxy, settings, start.config)
        model.set_env(
            PromptEditEnv(
                train_cases, scored, max_edits=max_edits, edits=edits, initial=start.config
            )
        )
        # set_env's new vector env is unseeded: its episodes would start from fresh entropy,
        # and two trainings with the same settings would differ
        model.get_env().seed(settings.seed + r)
        model.learn(
            total_timesteps=settings.model_timesteps,
            reset_num_timesteps=False,
            callback=_Steps(log, log.timesteps, total, tick),
        )
        log.record(
            validate(model, eval_env, reward, log.timesteps, say),
            lambda: copy.deepcopy(model.policy.state_dict()),
        )
        if r == rounds - 1:
            break
        if room(left(), reserve) == 0:
            log.stopped_by_budget = True
            say(f"LLM-call budget of {budget} reached after round {r + 1} of {rounds}: stopping")
            break
        heading = list(
            zip(
                train_cases,
                policy_configs(model, train_cases, start.config, max_edits, edits),
                strict=True,
            )
        )
        sampled = [
            pair
            for _ in range(4)
            for pair in zip(
                train_cases,
                policy_configs(
                    model, train_cases, start.config, max_edits, edits, deterministic=False
                ),
                strict=True,
            )
        ]
        ask = _uncertain_first(heading, data, proxy, fitted, max_edits)
        ask += _uncertain_first(sampled, data, proxy, fitted, max_edits)
        share = left() // (rounds - r)
        data.add(
            reward,
            proxy,
            ask,
            max_edits,
            room(share, reserve),
            say,
            f"round {r + 1}: where the policy heads",
        )
        say(
            f"round {r + 1}/{rounds}: {len(data.targets)} scored training answers "
            f"({scored.predicted} predicted by the model in PPO), {reward.llm_calls} LLM calls"
        )
    if folds and log.best is not None:
        say(
            f"out-of-fold check: {settings.folds} PPO runs of {log.best.timesteps:.0f} steps, "
            "each against a reward model that never saw its fold's training patients"
        )
        log.held_out = out_of_fold_gains(
            train_cases,
            data,
            proxy,
            reward,
            start,
            settings,
            int(log.best.timesteps),
            left(),
            say,
        )
    return log


__all__ = [
    "CoverageProxy",
    "ModelReward",
    "OutOfFold",
    "RewardModel",
    "ScoredAnswers",
    "learn_with_reward_model",
    "model_features",
    "out_of_fold_gains",
    "patient_of",
    "policy_configs",
]
