"""Stable-Baselines3 callbacks of policy training, and the log they fill.

- `TrainingMonitor`: a progress bar (or, for logs, a few lines) with the running
  reward, the LLM cache hit rate and the LLM calls; stops training at the
  LLM-call budget.
- `KeepBestOnValidation`: run by `MaskableEvalCallback` after each validation;
  records the validation curve and keeps the weights that scored best.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from promptenv.env import AnswerReward
from promptenv.policy_info import ValidationPoint
from recsys.type_aliases import Progress, Tick


@dataclass
class TrainingLog:
    """What training cost and how validation reward moved."""

    episodes: int = 0
    timesteps: int = 0
    episode_rewards: list[float] = field(default_factory=list)
    validation: list[ValidationPoint] = field(default_factory=list)
    stopped_by_budget: bool = False
    best: ValidationPoint | None = None
    #: the policy network's weights at ``best`` (None: the final weights are the best)
    best_weights: Any = None
    #: gains over the start config on training patients held out of a fold's training
    #: (`promptenv.reward_model.OutOfFold`; None: not measured)
    held_out: Any = None

    def record(self, point: ValidationPoint, weights: Callable[[], Any] | None) -> None:
        """Add a validation point; keep ``weights()`` when it is the best so far."""
        if self.best is None or point.validation_reward > self.best.validation_reward:
            self.best = point
            self.best_weights = weights() if weights is not None else None
        self.validation.append(point)


class TrainingMonitor(BaseCallback):
    """Follows training (``tick(steps, timesteps)`` for a bar, else progress lines with the
    running reward and cache hit rate); stops at the LLM budget."""

    def __init__(
        self,
        reward: AnswerReward,
        log: TrainingLog,
        timesteps: int,
        max_llm_calls: int,
        progress: Progress | None = None,
        tick: Tick | None = None,
    ) -> None:
        super().__init__()
        self.reward = reward
        self.log = log
        self.timesteps = timesteps
        self.max_llm_calls = max_llm_calls
        self.progress = progress
        self.tick = tick
        self.lines_every = 16 * max(1, timesteps // 128)  # about 8 lines per run

    def _on_step(self) -> bool:
        log, reward = self.log, self.reward
        if self.tick is not None:
            self.tick(self.num_timesteps, self.timesteps)
        log.timesteps = self.num_timesteps
        for done, info in zip(self.locals["dones"], self.locals["infos"], strict=True):
            if done and "final_reward" in info:
                log.episodes += 1
                log.episode_rewards.append(float(self.locals["rewards"][0]))
        if log.episodes and self.n_calls % 16 == 0:
            hit = 1 - reward.llm_calls / max(1, reward.answers)
            recent = np.mean(log.episode_rewards[-32:])
            if self.progress and self.tick is None and self.n_calls % self.lines_every == 0:
                # the same figures as lines, for logs (the flows show no bar)
                self.progress(
                    f"step {self.num_timesteps}/{self.timesteps}: running reward over the "
                    f"start prompt {recent:+.3f}, cache hit rate {hit:.0%}, "
                    f"{reward.llm_calls} LLM calls"
                )
        if reward.llm_calls >= self.max_llm_calls:
            log.stopped_by_budget = True
            if self.progress:
                self.progress(f"LLM-call budget of {self.max_llm_calls} reached: stopping")
            return False
        return True


class KeepBestOnValidation(BaseCallback):
    """After each validation of `MaskableEvalCallback` (its ``callback_after_eval``): record
    the point on the validation curve and keep the weights when they scored best so far."""

    def __init__(
        self, reward: AnswerReward, log: TrainingLog, progress: Progress | None = None
    ) -> None:
        super().__init__()
        self.reward = reward
        self.log = log
        self.progress = progress

    def _on_step(self) -> bool:
        parent: Any = self.parent  # the MaskableEvalCallback that just evaluated
        if parent is None:
            raise RuntimeError("KeepBestOnValidation runs as an evaluation callback's child")
        point = ValidationPoint(
            float(parent.num_timesteps),
            float(self.reward.llm_calls),
            float(parent.last_mean_reward),
        )
        self.log.record(point, lambda: copy.deepcopy(self.model.policy.state_dict()))
        if self.progress:
            self.progress(
                f"validation at {parent.num_timesteps} steps: reward over the start prompt "
                f"{parent.last_mean_reward:+.4f} ({self.reward.llm_calls} LLM calls so far)"
            )
        return True


__all__ = ["KeepBestOnValidation", "TrainingLog", "TrainingMonitor"]
