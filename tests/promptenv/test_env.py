"""The prompt-editing environment: gymnasium/SB3 checks, seeding, masks, the edit space."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from echo_llm import history_signals
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.logger import Logger

from promptenv.editing import (
    EDITS,
    K_LADDER,
    N_EDITS,
    STOP,
    EditCase,
    allowed_mask,
    apply_edit,
    build_cases,
    edit_mask,
    inverse,
    random_edits,
)
from promptenv.env import PromptEditEnv
from promptenv.prompts import INITIAL_CONFIG, PromptConfig, assemble


def action(label: str) -> int:
    return next(i for i, e in enumerate(EDITS) if e.label == label)


@pytest.fixture(scope="module")
def cases(default_tables: dict[str, pd.DataFrame]) -> list[EditCase]:
    idx = default_tables["index_encounters"]
    train = idx[idx["split"] == "train"]
    rows = pd.concat(
        [train[train["is_obstetric"]].sample(4, random_state=1), train.sample(4, random_state=2)]
    )
    return build_cases(default_tables, rows, history_signals(default_tables))  # type: ignore[arg-type]


def words_reward(case: EditCase, config: PromptConfig) -> float:
    """A cheap reward that depends on the prompt text (no LLM): fewer words, more reward."""
    return -len(assemble(case.context, case.signals, config).system.split()) / 400


def test_environment_passes_the_sb3_checker(cases: list[EditCase]) -> None:
    check_env(PromptEditEnv(cases, words_reward), warn=True)


def test_features_are_bounded_and_differ_between_patients(cases: list[EditCase]) -> None:
    feats = np.stack([c.features for c in cases])
    assert feats.min() >= 0.0 and feats.max() <= 1.0
    assert len({f.tobytes() for f in feats}) == len(cases)


def rollout(env: PromptEditEnv, seed: int, pick: Callable[[np.ndarray], int]) -> list[tuple]:
    obs, info = env.reset(seed=seed)
    out: list[tuple] = [(obs.tobytes(), info["encounter_id"])]
    done = False
    while not done:
        a = pick(env.action_masks())
        obs, reward, done, truncated, info = env.step(a)
        out.append((a, obs.tobytes(), reward, done, truncated))
    return out


def test_same_seed_same_episodes(cases: list[EditCase]) -> None:
    def runs(seed: int) -> list[list[tuple]]:
        env = PromptEditEnv(cases, words_reward, max_edits=4)
        rng = np.random.default_rng(seed)
        pick = lambda m: int(rng.choice(np.flatnonzero(m)))  # noqa: E731
        return [rollout(env, seed + i, pick) for i in range(6)]

    assert runs(3) == runs(3)
    assert runs(3) != runs(4)


def test_masks_rule_out_invalid_edits() -> None:
    mask = edit_mask(INITIAL_CONFIG)
    assert mask[STOP]
    assert not mask[action("add profile")] and mask[action("remove profile")]
    assert mask[action("add encounters")] and not mask[action("remove encounters")]
    assert not mask[action("more encounters")] and not mask[action("fewer encounters")]
    one = replace(INITIAL_CONFIG, fragments=("peer",))
    assert not edit_mask(one)[action("remove peer")]
    top = INITIAL_CONFIG.with_k("self", K_LADDER[-1])
    assert not edit_mask(top)[action("more self")] and edit_mask(top)[action("fewer self")]
    for i in np.flatnonzero(~mask):
        with pytest.raises(ValueError, match="not valid"):
            apply_edit(INITIAL_CONFIG, int(i))


def test_edits_keep_the_canonical_order_and_the_k_ladder() -> None:
    cfg = apply_edit(INITIAL_CONFIG, action("remove problems"))
    assert "problems" not in cfg.fragments
    back = apply_edit(cfg, action("add problems"))
    assert back.fragments == INITIAL_CONFIG.fragments
    assert apply_edit(INITIAL_CONFIG, action("more peer")).k_peer == 8  # 6 is off the ladder
    assert apply_edit(INITIAL_CONFIG, action("fewer peer")).k_peer == 5
    switched = apply_edit(INITIAL_CONFIG, action("style"))
    assert (
        switched.style == "explanation" and apply_edit(switched, action("style")) == INITIAL_CONFIG
    )
    cfg, trace = random_edits(INITIAL_CONFIG, 5, np.random.default_rng(0))
    assert len(trace) == 5 and "stop" not in trace


def test_episode_ends_at_the_edit_limit_and_only_stop_is_left(cases: list[EditCase]) -> None:
    env = PromptEditEnv(cases, words_reward, max_edits=2)
    env.reset(seed=0)
    _, r1, done1, _, _ = env.step(action("remove problems"))
    assert (r1, done1) == (0.0, False)
    _, r2, done2, _, info = env.step(action("remove medications"))
    assert done2 and info["edits"] == ["remove problems", "remove medications"]
    # the relative reward is the final reward minus the initial prompt's
    assert r2 == pytest.approx(info["final_reward"] - info["initial_reward"])
    assert r2 > 0  # a shorter prompt under words_reward
    env.reset(seed=0)
    env.step(action("remove problems"))
    env.edits = env.max_edits
    assert env.action_masks().tolist() == [i == STOP for i in range(N_EDITS)]


def test_a_masked_action_changes_nothing(cases: list[EditCase]) -> None:
    env = PromptEditEnv(cases, words_reward, max_edits=3)
    env.reset(seed=1)
    before = env.config
    env.step(action("add profile"))  # already in: masked
    assert env.config == before and env.edits == 1


def test_maskable_ppo_never_picks_a_masked_edit(cases: list[EditCase]) -> None:
    from sb3_contrib import MaskablePPO

    env = PromptEditEnv(cases, words_reward, max_edits=4)
    model = MaskablePPO("MlpPolicy", env, n_steps=32, batch_size=16, seed=0, device="cpu")
    rng = np.random.default_rng(0)
    for _ in range(200):
        cfg, _ = random_edits(INITIAL_CONFIG, int(rng.integers(0, 6)), rng)
        mask = edit_mask(cfg)
        obs = rng.random(env.observation_space.shape).astype(np.float32)
        a, _ = model.predict(obs, action_masks=mask, deterministic=False)
        assert mask[int(a)]


def test_sequential_mode_visits_every_case_in_order(cases: list[EditCase]) -> None:
    env = PromptEditEnv(cases, words_reward, sequential=True)
    seen = [env.reset()[1]["encounter_id"] for _ in range(len(cases) * 2)]
    ids = [c.encounter_id for c in cases]
    assert seen == ids + ids


def test_environment_rejects_bad_cases(cases: list[EditCase]) -> None:
    with pytest.raises(ValueError, match="at least one case"):
        PromptEditEnv([], words_reward)
    bad = replace(cases[0], features=cases[0].features[:5])
    with pytest.raises(ValueError, match="wrong size"):
        PromptEditEnv([bad], words_reward)


def test_the_edit_that_undoes_the_previous_one_is_masked(cases: list[EditCase]) -> None:
    env = PromptEditEnv(cases, words_reward, max_edits=4)
    env.reset(seed=0)
    env.step(action("remove problems"))
    assert not env.action_masks()[action("add problems")]
    env.step(action("more self"))
    assert not env.action_masks()[action("fewer self")]
    assert env.action_masks()[action("add problems")]  # only the previous edit is protected
    _, trace = random_edits(INITIAL_CONFIG, 6, np.random.default_rng(5))
    for a, b in itertools.pairwise(trace):
        assert EDITS[inverse(action(a)) or 0].label != b


def test_every_fixed_config_reaches_every_other_within_the_edit_limit() -> None:
    """A policy may start from any fixed method's config: the edit space must reach each of
    the others within the default 6 edits."""
    from collections import deque

    from promptenv.prompts import CONFIG_METHODS, fixed_config

    configs = {m: fixed_config(m) for m in CONFIG_METHODS}
    for start in configs.values():
        depth = {start: 0}
        queue = deque([start])
        while queue:
            cfg = queue.popleft()
            if depth[cfg] == 6:
                continue
            for a in np.flatnonzero(edit_mask(cfg)):
                nxt = apply_edit(cfg, int(a))
                if nxt not in depth:
                    depth[nxt] = depth[cfg] + 1
                    queue.append(nxt)
        assert all(target in depth for target in configs.values())


def test_a_restricted_edit_space_allows_only_its_edits_and_stop(cases: list[EditCase]) -> None:
    """``edits`` (by label) restricts the environment's masks, a masked step changes nothing,
    and MaskablePPO's policy, in training and as a saved policy would edit, stays within it."""
    from sb3_contrib import MaskablePPO

    from promptenv.policy import policy_in_training
    from promptenv.prompts import fixed_config

    allowed = ("add self", "fewer self")
    inside = {action(label) for label in allowed} | {STOP}
    peer = fixed_config("peer")
    env = PromptEditEnv(cases, words_reward, max_edits=3, edits=allowed, initial=peer)
    env.reset(seed=0)
    assert set(np.flatnonzero(env.action_masks())) == {STOP, action("add self")}
    assert edit_mask(peer)[action("add style")]  # valid, but outside the space: masked
    env.step(action("add style"))
    assert env.config == peer and env.edits == 1
    env.step(action("add self"))
    assert set(np.flatnonzero(env.action_masks())) == {STOP, action("fewer self")}

    model = MaskablePPO("MlpPolicy", env, n_steps=32, batch_size=16, seed=0, device="cpu")
    model.set_logger(Logger(folder=None, output_formats=[]))  # else an empty /tmp/SB3-<date>
    model.learn(64)
    for deterministic in (True, False):
        policy = policy_in_training(model, peer, 3, allowed)
        for config, trace in policy.edit_many(cases, deterministic):
            assert set(trace) <= set(allowed)
            assert config.fragments in (peer.fragments, ("self", "peer"))
    unrestricted = allowed_mask(())
    assert unrestricted is None
    mask = allowed_mask(allowed)
    assert mask is not None and set(np.flatnonzero(mask)) == inside
    with pytest.raises(ValueError, match="unknown edit 'add selff'"):
        PromptEditEnv(cases, words_reward, edits=("add selff",))

    # a saved policy's settings carry the space, and read back as they were
    from promptenv.policy import PolicySettings

    saved = json.loads(json.dumps(PolicySettings(edits=allowed).to_json(), default=str))
    assert saved["edits"] == list(allowed)
    assert PolicySettings.from_json(saved).edits == allowed
    assert PolicySettings.from_json({k: v for k, v in saved.items() if k != "edits"}).edits == ()
    with pytest.raises(ValueError, match="unknown edit 'add selff'"):
        PolicySettings(edits=("add selff",))
