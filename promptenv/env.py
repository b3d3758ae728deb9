"""`PromptEditEnv`: a gymnasium environment in which a policy edits one patient's prompt.

An episode is one training index encounter (`promptenv.editing.EditCase`). It
starts from the initial PMLM config; each step applies one edit
(`promptenv.editing.EDITS`; invalid ones are masked by `action_masks`; an
agent that ignores the mask and sends one anyway gets no change, and the step
counts toward the limit, so every episode ends). The
episode ends when the policy stops or after ``max_edits`` edits. ``edits``
restricts the edits to some labels (`promptenv.editing.allowed_mask`). Then, and only
then, the LLM answers the edited prompt and the answer is scored against the
physician's next plan (`AnswerReward`).

Reward (documented shaping): with ``relative=True`` (the default) the final
reward is the scorer's reward of the edited prompt's answer minus that of the
initial prompt's answer for the same encounter. The subtracted term does not
depend on the policy's actions, so the optimal policy is unchanged; it removes
the large between-patient differences from the return and so the variance of
the policy gradient. Intermediate steps give 0.

Observation: `N_PATIENT_FEATURES` numbers about the patient (profile, signal
scores, peer support, a compact embedding of the predicted items; see
`promptenv.editing.case_features`) followed by the current config
(`promptenv.editing.config_features`), all in [0, 1].

With ``sequential=True`` every reset takes the next case in order (for
evaluation over a fixed set); otherwise the case is drawn with the
environment's seeded generator, so a seed fixes the episode sequence.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from numpy.typing import NDArray

from promptenv.editing import (
    EDITS,
    N_CONFIG_FEATURES,
    N_EDITS,
    N_PATIENT_FEATURES,
    STOP,
    EditCase,
    allowed_mask,
    apply_edit,
    observation,
    step_mask,
)
from promptenv.llm import GenerationParams, GenerationRequest, LLMClient
from promptenv.prompts import INITIAL_CONFIG, Prompt, PromptConfig, assemble
from promptenv.reward import PlanScorer, Score

RewardFn = Callable[[EditCase, PromptConfig], float]


@dataclass(frozen=True)
class EditChoice:
    """What an edit method (`promptenv.search`) chose for one case, and the LLM calls it spent."""

    config: PromptConfig
    trace: tuple[str, ...] = ()
    llm_calls: int = 0
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Answered:
    """One prompt, the LLM's answer to it and the answer's score."""

    prompt: Prompt
    answer: str
    score: Score
    cached: bool


class AnswerReward:
    """Asks the LLM to answer a case's prompt and scores the answer against the case's plan.

    Answers go through the `LLMClient` (its cache makes a repeated prompt free);
    scores are also kept in memory per (encounter, prompt text). ``llm_calls``
    counts the answers that were not in the client's cache.
    """

    def __init__(self, client: LLMClient, scorer: PlanScorer, params: GenerationParams) -> None:
        self.client = client
        self.scorer = scorer
        self.params = params
        self.llm_calls = 0
        self.answers = 0
        #: progress of the calls ``answer_many`` makes when it is given none (a caller
        #: such as `pmlm evaluate` sets it around an edit method's search)
        self.progress: Callable[[int, int], None] | None = None
        self._memo: dict[tuple[str, str], Answered] = {}
        self._lock = threading.Lock()

    def answer_many(
        self,
        pairs: Sequence[tuple[EditCase, PromptConfig]],
        concurrency: int = 1,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Answered]:
        """Answer and score many (case, config) pairs; repeated prompts are asked once.

        ``progress(done, total)`` follows the prompts not answered before (see
        `LLMClient.generate_many`)."""
        prompts = [assemble(c.context, c.signals, cfg, "pmlm") for c, cfg in pairs]
        keys = [(c.encounter_id, p.system) for (c, _), p in zip(pairs, prompts, strict=True)]
        todo = {k: i for i, k in enumerate(keys) if k not in self._memo}
        if todo:
            order = list(todo.values())
            completions = self.client.generate_many(
                [GenerationRequest(prompts[i].system, prompts[i].user, self.params) for i in order],
                concurrency=concurrency,
                progress=progress or self.progress,
            )
            scores = self.scorer.score_many(
                [c.text for c in completions],
                [list(pairs[i][0].reference_items) for i in order],
                [pairs[i][0].plan_text for i in order],
            )
            with self._lock:
                for i, completion, score in zip(order, completions, scores, strict=True):
                    self.llm_calls += 0 if completion.cached else 1
                    self._memo[keys[i]] = Answered(
                        prompts[i], completion.text, score, completion.cached
                    )
        self.answers += len(pairs)
        return [self._memo[k] for k in keys]

    def answer(self, case: EditCase, config: PromptConfig) -> Answered:
        return self.answer_many([(case, config)])[0]

    def is_answered(self, case: EditCase, config: PromptConfig) -> bool:
        """True when this reward answered ``config`` for ``case`` already (asking again is free)."""
        prompt = assemble(case.context, case.signals, config, "pmlm")
        return (case.encounter_id, prompt.system) in self._memo

    def __call__(self, case: EditCase, config: PromptConfig) -> float:
        return self.answer(case, config).score.reward


#: Chooses one config per case, possibly asking the LLM through the reward (see `promptenv.search`).
EditMethod = Callable[[Sequence[EditCase], AnswerReward], list[EditChoice]]


class PromptEditEnv(gym.Env[NDArray[np.float32], np.int64]):
    """Edit one index encounter's prompt; the reward comes from the LLM's answer at the end."""

    metadata = {"render_modes": ["ansi"]}  # noqa: RUF012 (gymnasium declares it on the instance)

    def __init__(
        self,
        cases: Sequence[EditCase],
        reward: RewardFn,
        *,
        max_edits: int = 6,
        edits: Sequence[str] = (),
        initial: PromptConfig = INITIAL_CONFIG,
        relative: bool = True,
        sequential: bool = False,
        render_mode: str | None = None,
    ) -> None:
        if not cases:
            raise ValueError("PromptEditEnv needs at least one case (index encounter)")
        if max_edits < 1:
            raise ValueError("max_edits must be at least 1")
        bad = [c.encounter_id for c in cases if c.features.shape != (N_PATIENT_FEATURES,)]
        if bad:
            raise ValueError(
                f"cases {bad[:3]} have patient features of the wrong size "
                f"(want {N_PATIENT_FEATURES}; build them with promptenv.editing.case_features)"
            )
        self.cases = list(cases)
        self.reward_fn = reward
        self.max_edits = max_edits
        #: the edits episodes may make, by label (empty: every edit; `allowed_mask`)
        self.allowed = tuple(edits)
        self._allowed = allowed_mask(self.allowed)
        self.initial = initial
        self.relative = relative
        self.sequential = sequential
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(
            0.0, 1.0, shape=(N_PATIENT_FEATURES + N_CONFIG_FEATURES,), dtype=np.float32
        )
        self.action_space = gym.spaces.Discrete(N_EDITS)
        self._next = 0
        self.case = self.cases[0]
        self.config = initial
        self.edits = 0
        self.last: int | None = None
        self.trace: list[str] = []

    def _obs(self) -> NDArray[np.float32]:
        return observation(self.case.features, self.config, self.edits, self.max_edits)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        if "case" in options:
            index = int(options["case"])
        elif self.sequential:
            index = self._next % len(self.cases)
            self._next += 1
        else:
            index = int(self.np_random.integers(len(self.cases)))
        self.case = self.cases[index]
        self.config = self.initial
        self.edits = 0
        self.last = None
        self.trace = []
        return self._obs(), {"encounter_id": self.case.encounter_id, "case": index}

    def action_masks(self) -> NDArray[np.bool_]:
        """Valid edits now (sb3-contrib's MaskablePPO reads this)."""
        return step_mask(self.config, self.last, self.edits, self.max_edits, self._allowed)

    def step(
        self, action: np.int64 | int
    ) -> tuple[NDArray[np.float32], float, bool, bool, dict[str, Any]]:
        a = int(action)
        if not 0 <= a < N_EDITS:
            raise ValueError(f"action {a} is outside the action space 0..{N_EDITS - 1}")
        if not self.action_masks()[a]:
            # masked edits are not punished: the prompt stays as it is, the step still counts
            self.edits += 1
            self.trace.append(f"(masked: {EDITS[a].label})")
        elif a != STOP:
            self.config = apply_edit(self.config, a)
            self.edits += 1
            self.last = a
            self.trace.append(EDITS[a].label)
        done = a == STOP or self.edits >= self.max_edits
        reward = 0.0
        info: dict[str, Any] = {"encounter_id": self.case.encounter_id}
        if done:
            final = self.reward_fn(self.case, self.config)
            base = self.reward_fn(self.case, self.initial) if self.relative else 0.0
            reward = float(final - base)
            info.update(
                final_reward=float(final),
                initial_reward=float(base) if self.relative else None,
                edits=list(self.trace),
                config=self.config.as_dict(),
            )
        return self._obs(), reward, done, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return (
            f"{self.case.encounter_id}: {self.edits} edits {self.trace}; "
            f"fragments {list(self.config.fragments)}"
        )


__all__ = ["AnswerReward", "Answered", "EditChoice", "EditMethod", "PromptEditEnv", "RewardFn"]
