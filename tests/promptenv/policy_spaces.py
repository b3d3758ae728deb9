"""The policy's spaces alone: enough to build and save a MaskablePPO in a test."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from promptenv.editing import N_CONFIG_FEATURES, N_EDITS, N_PATIENT_FEATURES


class PolicySpaces(gym.Env[Any, Any]):
    """The observation and action spaces of `promptenv.env.PromptEditEnv`, nothing else."""

    observation_space = gym.spaces.Box(
        0.0, 1.0, shape=(N_PATIENT_FEATURES + N_CONFIG_FEATURES,), dtype=np.float32
    )
    action_space = gym.spaces.Discrete(N_EDITS)

    def reset(self, *, seed: int | None = None, options: Any = None) -> Any:
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> Any:
        return self.observation_space.sample(), 0.0, True, False, {}

    def action_masks(self) -> np.ndarray:
        return np.ones(N_EDITS, dtype=bool)
