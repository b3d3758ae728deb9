"""Policy training (short, in CI), saving, applying with no LLM call, and the edit-method comparisons.

The LLM is `EchoBackend` (answers with the prompt's bullet lines), so a few
hundred PPO steps take seconds and every reward is reproducible.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from echo_llm import EchoBackend, history_signals
from stable_baselines3.common.logger import Logger

from promptenv.editing import EditCase, build_cases
from promptenv.env import AnswerReward
from promptenv.evaluate import EvalSettings, evaluate_methods
from promptenv.llm import LLMClient
from promptenv.policy import (
    PolicyInfo,
    PolicySettings,
    TrainedPolicy,
    TrainingSummary,
    ValidationPoint,
    calls_to_final,
    load_policy,
    pick_training_encounters,
    save_policy,
    train_policy,
    training_summary,
)
from promptenv.prompt_table import build_prompt_table
from promptenv.prompts import INITIAL_CONFIG, PromptConfig
from promptenv.reward import PlanScorer
from promptenv.search import (
    PerPatientSearch,
    RandomEdits,
    edit_methods,
    is_edit_method,
    last_known_plan,
)

# a few hundred PPO steps with answers from the echo LLM: about a minute on 2 cores
pytestmark = pytest.mark.slow

SHORT = PolicySettings(
    n_train=16,
    n_validation=6,
    timesteps=512,
    n_steps=64,
    batch_size=32,
    n_epochs=10,
    eval_freq=128,
    n_calibration=6,
    max_llm_calls=10_000,
    keep_best=False,  # the learning test below looks at what PPO learned by the end
)


@pytest.fixture(scope="module")
def trained(
    default_tables: dict[str, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainedPolicy, LLMClient, EchoBackend]:
    backend = EchoBackend()
    client = LLMClient(backend, workspace=tmp_path_factory.mktemp("ws"))
    folder = tmp_path_factory.mktemp("policy")
    sb3_logs = tmp_path_factory.mktemp("sb3") / "logs"
    with pytest.MonkeyPatch.context() as patch:
        # where SB3's default logger would make its folder
        patch.setenv("SB3_LOGDIR", str(sb3_logs))
        result = train_policy(
            client,
            default_tables,
            history_signals(default_tables),  # type: ignore[arg-type]
            folder,
            SHORT,
            versions={"data_hash": "d1", "recommender": "history"},
            tick=lambda done, total: TICKS.append((done, total)),
        )
    assert not sb3_logs.exists(), "training left an SB3 log folder behind"
    return result, client, backend


#: What training's ``tick`` (the command line's progress bar) received.
TICKS: list[tuple[int, int]] = []


def test_short_training_saves_a_policy_with_its_provenance(
    trained: tuple[TrainedPolicy, LLMClient, EchoBackend],
) -> None:
    result, client, backend = trained
    info = json.loads((result.path / "policy.json").read_text())
    assert info["version"] == result.policy.version and len(info["version"]) == 12
    assert info["trained_with"]["data_hash"] == "d1"
    assert info["trained_with"]["recommender"] == "history"
    assert info["trained_with"]["llm"] == client.label
    assert info["settings"]["timesteps"] == SHORT.timesteps
    training = info["training"]
    assert training["timesteps"] == SHORT.timesteps
    # the progress bar followed every PPO step, up to the last
    assert [d for d, _ in TICKS] == list(range(1, SHORT.timesteps + 1))
    assert {t for _, t in TICKS} == {SHORT.timesteps}
    assert training["episodes"] > 20
    # every answer not served from the cache reached the backend, and only those
    assert training["llm_calls"] <= backend.calls
    assert 0 < training["cache_hit_rate"] < 1
    assert len(training["validation_curve"]) >= SHORT.timesteps // SHORT.eval_freq
    assert training["llm_calls_to_final_validation_reward"] <= training["llm_calls"] + 2 * 22


def test_a_loaded_policy_edits_like_the_trained_one_without_any_llm_call(
    trained: tuple[TrainedPolicy, LLMClient, EchoBackend], default_tables: dict[str, pd.DataFrame]
) -> None:
    result, _, backend = trained
    loaded = load_policy(result.path)
    idx = default_tables["index_encounters"]
    rows = idx[idx["split"] == "test"].head(12)
    cases = build_cases(default_tables, rows, history_signals(default_tables))  # type: ignore[arg-type]
    calls = backend.calls
    assert loaded.edit_many(cases) == result.policy.edit_many(cases)
    table = build_prompt_table(
        {**default_tables, "index_encounters": rows},
        ["pmlm_initial", "pmlm"],
        history_signals(default_tables),  # type: ignore[arg-type]
        "all",
        policy=loaded,
    )
    assert backend.calls == calls  # applying the policy asks no LLM
    refined = table[table["method"] == "pmlm"]
    assert len(refined) == len(rows)
    for prov, cfg in zip(refined["provenance"], refined["config"], strict=True):
        p = json.loads(prov)
        assert p["policy"] == loaded.version and isinstance(p["edits"], list)
        assert len(p["edits"]) <= SHORT.max_edits
        assert json.loads(cfg)["fragments"]


def test_maskable_ppo_learns_the_edits_that_pay(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    """On the environment with a reward that needs no LLM (shorter prompts pay), PPO must beat
    both the initial prompt and random edits as many as it makes: the observation, the masks
    and the edits carry what a policy needs to learn."""
    from sb3_contrib import MaskablePPO

    from promptenv.env import PromptEditEnv
    from promptenv.policy import Policy
    from promptenv.prompts import assemble

    def shorter(case: EditCase, config: PromptConfig) -> float:
        return -len(assemble(case.context, case.signals, config).system.split()) / 200

    idx = default_tables["index_encounters"]
    rows = pick_training_encounters(idx, "train", 16, 0.5, 2, 0)
    cases = build_cases(default_tables, rows, history_signals(default_tables))  # type: ignore[arg-type]
    env = PromptEditEnv(cases, shorter, max_edits=6)
    model = MaskablePPO(
        "MlpPolicy", env, n_steps=128, batch_size=64, learning_rate=1e-3, seed=0, device="cpu"
    )
    model.set_logger(Logger(folder=None, output_formats=[]))  # else an empty /tmp/SB3-<date>
    model.learn(1536)
    policy = Policy(model, PolicyInfo(settings=PolicySettings(max_edits=6)))
    initial = np.mean([shorter(c, INITIAL_CONFIG) for c in cases])
    learned = np.mean(
        [shorter(c, cfg) for c, (cfg, _) in zip(cases, policy.edit_many(cases), strict=True)]
    )
    client = LLMClient(EchoBackend(), workspace=tmp_path, use_cache=False)
    reward = AnswerReward(client, PlanScorer(threshold=0.5), SHORT.params)  # unused by RandomEdits
    shuffled = RandomEdits(like=policy, seed=1)(cases, reward)
    random = np.mean([shorter(c, ch.config) for c, ch in zip(cases, shuffled, strict=True)])
    assert learned > initial + 0.1
    assert learned > random


def test_training_stops_at_the_llm_budget(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    backend = EchoBackend()
    client = LLMClient(backend, workspace=tmp_path / "ws")
    settings = PolicySettings(
        n_train=16,
        n_validation=4,
        timesteps=2000,
        n_steps=32,
        batch_size=32,
        n_epochs=1,
        eval_freq=10_000,
        n_calibration=4,
        max_llm_calls=30,
    )
    result = train_policy(
        client,
        default_tables,
        history_signals(default_tables),
        tmp_path / "p",
        settings,  # type: ignore[arg-type]
    )
    training = result.policy.info.training
    assert training.stopped_by_budget
    # the step that reaches it asks at most 2 answers, the final validation one per encounter
    assert 30 <= training.llm_calls <= 32 + settings.n_validation
    assert training.timesteps < 2000


def test_training_keeps_the_policy_that_did_best_on_validation(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    settings = PolicySettings(
        n_train=12,
        n_validation=4,
        timesteps=256,
        n_steps=32,
        batch_size=32,
        n_epochs=2,
        eval_freq=32,
        n_calibration=4,
    )
    result = train_policy(
        LLMClient(EchoBackend(), workspace=tmp_path / "ws"),
        default_tables,
        history_signals(default_tables),  # type: ignore[arg-type]
        tmp_path / "p",
        settings,
    )
    training = result.policy.info.training
    curve = training.validation_curve
    assert len(curve) == 256 // 32
    best = max(curve, key=lambda p: p.validation_reward)
    assert training.kept_validation_reward == best.validation_reward
    assert training.kept_timesteps == best.timesteps
    assert training.final_validation_reward == curve[-1].validation_reward


class FirstEdit:
    """A network that always picks the first allowed edit other than stop."""

    def predict(self, obs: object, action_masks: np.ndarray, deterministic: bool) -> tuple:
        from promptenv.editing import STOP

        allowed = [a for a in np.flatnonzero(action_masks) if a != STOP]
        return (allowed[0] if allowed else STOP), None


def test_a_policy_that_beat_no_checkpoint_keeps_its_start_prompt(
    trained: tuple[TrainedPolicy, LLMClient, EchoBackend],
    default_tables: dict[str, pd.DataFrame],
    tmp_path: Path,
) -> None:
    """When validation found no checkpoint better than the initial prompt, the saved policy
    edits nothing whatever its network says, says so, and has a version of its own."""
    from promptenv.policy import Policy

    rows = default_tables["index_encounters"]
    rows = rows[rows["split"] == "test"].head(6)
    cases = build_cases(default_tables, rows, history_signals(default_tables))  # type: ignore[arg-type]
    settings = PolicySettings(max_edits=3)
    eager = Policy(FirstEdit(), PolicyInfo(settings=settings))
    assert all(len(trace) == 3 for _, trace in eager.edit_many(cases))
    lazy = Policy(
        FirstEdit(),
        PolicyInfo(settings=settings, training=TrainingSummary(falls_back_to_start=True)),
    )
    assert lazy.edit_many(cases) == [(INITIAL_CONFIG, [])] * len(cases)

    result, _, _ = trained
    info = dataclasses.replace(
        result.policy.info,
        training=dataclasses.replace(
            result.policy.info.training, kept_validation_reward=-0.1, falls_back_to_start=True
        ),
    )
    fallback = save_policy(result.policy.model, info, tmp_path / "fallback")
    reloaded = load_policy(tmp_path / "fallback")
    assert reloaded.falls_back_to_start and reloaded.version == fallback.version
    assert reloaded.edit_many(cases) == [(fallback.start, [])] * len(cases)
    assert fallback.version != result.policy.version  # same weights, other behaviour
    assert "on validation beyond noise, so it keeps that prompt" in training_summary(fallback)
    pooled = dataclasses.replace(
        info.training,
        out_of_fold_gain=-0.01,
        out_of_fold_encounters=40,
        pooled_low=-0.03,
        pooled_high=0.01,
    )
    said = training_summary(
        dataclasses.replace(fallback, info=dataclasses.replace(info, training=pooled))
    )
    assert "on validation and out of fold beyond noise" in said
    assert (
        "out of fold -0.0100 on 40 training encounters, pooled with validation [-0.0300, +0.0100]"
        in said
    )
    assert not result.policy.falls_back_to_start  # trained with keep_best=False
    assert "kept the weights of step" in training_summary(result.policy)


#: A few PPO steps on 8 + 4 encounters: enough to decide the fall-back rule.
TINY = PolicySettings(
    n_train=8,
    n_validation=4,
    timesteps=64,
    n_steps=32,
    batch_size=32,
    n_epochs=1,
    eval_freq=32,
    n_calibration=4,
)


class AnswersOnly(EchoBackend):
    """Echoes the prompts in ``good`` and the calibration's oracle prompts; answers every other
    prompt with a word that matches no plan."""

    def __init__(self, good: set[str]) -> None:
        super().__init__()
        self.good = good

    def complete(self, messages, params):  # type: ignore[no-untyped-def]
        reply = super().complete(messages, params)
        system = messages[0].content
        if system not in self.good and not system.startswith("At the next visit"):
            return type(reply)(**{**reply.__dict__, "text": "Rest."})
        return reply


def tiny_cases(tables: dict[str, pd.DataFrame]) -> list[EditCase]:
    """The training and validation encounters `TINY` trains on, as edit cases."""
    from promptenv.policy import pick_episodes

    episodes = pd.concat(pick_episodes(tables["index_encounters"], TINY))
    return build_cases(tables, episodes, history_signals(tables))  # type: ignore[arg-type]


def train_tiny(
    tables: dict[str, pd.DataFrame], good: PromptConfig, tmp_path: Path
) -> TrainedPolicy:
    """`TINY` training with a backend that answers only ``good``'s prompts well."""
    from promptenv.prompts import assemble

    systems = {assemble(c.context, c.signals, good).system for c in tiny_cases(tables)}
    return train_policy(
        LLMClient(AnswersOnly(systems), workspace=tmp_path / "ws"),
        tables,
        history_signals(tables),  # type: ignore[arg-type]
        tmp_path / "p",
        TINY,
    )


def test_the_initial_prompt_competes_with_the_checkpoints(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    """Training decides the fall-back from the validation curve: it falls back exactly when
    the best validation reward is not above 0 (here forced by a backend that answers the
    initial prompts well and every edited one badly)."""
    result = train_tiny(default_tables, INITIAL_CONFIG, tmp_path)
    training = result.policy.info.training
    assert training.kept_validation_reward <= 0
    assert training.falls_back_to_start and result.policy.falls_back_to_start


def test_the_training_sample_gets_its_obstetric_share_within_the_cap_per_patient() -> None:
    """Patients with a pregnancy have many more other encounters than obstetric ones; the
    cap per patient must not be spent on those before the obstetric half is drawn."""
    rows = []
    for p in range(20):
        for e in range(12):  # 2 obstetric and 10 other encounters each
            rows.append((f"p{p}-e{e}", f"p{p}", "train", e < 2))
    rows += [(f"q{p}-e{e}", f"q{p}", "train", False) for p in range(20) for e in range(3)]
    rows += [("v-e0", "v", "validation", True)]
    index = pd.DataFrame(rows, columns=["encounter_id", "patient_id", "split", "is_obstetric"])

    picked = pick_training_encounters(index, "train", 40, 0.5, 2, seed=3)
    assert len(picked) == 40 and picked["encounter_id"].is_unique
    assert set(picked["split"]) == {"train"}
    assert int(picked["is_obstetric"].sum()) == 20
    assert picked.groupby("patient_id").size().max() <= 2
    # the cap holds across the two halves, and a short split gives what it has
    everything = pick_training_encounters(index, "train", 1000, 0.5, 2, seed=3)
    assert len(everything) == 80 and int(everything["is_obstetric"].sum()) == 40
    assert everything.groupby("patient_id").size().max() == 2
    assert pick_training_encounters(index, "train", 40, 0.5, 2, seed=3).equals(picked)


def test_calls_to_final_reward() -> None:
    curve = [
        ValidationPoint(timesteps=1.0, llm_calls=10.0, validation_reward=0.0),
        ValidationPoint(timesteps=2.0, llm_calls=20.0, validation_reward=0.1),
        ValidationPoint(timesteps=3.0, llm_calls=30.0, validation_reward=0.098),
    ]
    assert calls_to_final(curve) == 20.0
    assert np.isnan(calls_to_final([]))


def test_validation_is_the_mean_reward_of_the_policy_s_prompts_over_the_start_prompt(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    """`validate_policy` (PPO's final validation and each reward-model round's): on every
    encounter of the environment, the policy's edits of the environment's start config are
    answered and scored against the start config's answer, the LLM calls counted."""
    from promptenv.env import PromptEditEnv
    from promptenv.policy import policy_in_training, validate_policy
    from promptenv.prompts import fixed_config

    cases = obstetric_test_cases(default_tables, 5)
    start = fixed_config("peer")
    backend = EchoBackend()
    client = LLMClient(backend, workspace=tmp_path / "ws", use_cache=False)
    reward = AnswerReward(client, PlanScorer(threshold=0.5), SHORT.params)
    env = PromptEditEnv(cases, reward, max_edits=3, initial=start, sequential=True)
    ticks: list[tuple[int, int]] = []
    point = validate_policy(FirstEdit(), env, reward, 96, lambda d, t: ticks.append((d, t)))

    edited = [cfg for cfg, _ in policy_in_training(FirstEdit(), start, 3).edit_many(cases)]
    assert all(cfg != start for cfg in edited)
    assert backend.calls == 2 * len(cases) and ticks[-1] == (2 * len(cases), 2 * len(cases))
    gains = [reward(c, cfg) - reward(c, start) for c, cfg in zip(cases, edited, strict=True)]
    assert backend.calls == 2 * len(cases)  # every answer above was in the reward's memory
    assert (point.timesteps, point.llm_calls) == (96.0, 2.0 * len(cases))
    assert point.validation_reward == pytest.approx(np.mean(gains))
    assert len(set(gains)) > 1  # the edits change the answers: a wrong pairing would show


def obstetric_test_cases(tables: dict[str, pd.DataFrame], n: int) -> list[EditCase]:
    """The first ``n`` obstetric test encounters as edit cases, with their references."""
    from promptenv.evaluate import references

    idx = tables["index_encounters"]
    rows = idx[(idx["split"] == "test") & idx["is_obstetric"]].head(n)
    return build_cases(
        tables,
        rows,
        history_signals(tables),
        references(tables, rows),  # type: ignore[arg-type]
    )


def test_per_patient_search_keeps_its_best_candidate_and_counts_its_calls(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    cases = obstetric_test_cases(default_tables, 5)
    backend = EchoBackend()
    reward = AnswerReward(
        LLMClient(backend, workspace=tmp_path), PlanScorer(threshold=0.5), SHORT.params
    )
    s4, s16 = PerPatientSearch(4), PerPatientSearch(16)
    for case in cases:
        c4, c16 = s4.candidates(case), s16.candidates(case)
        assert c4 == c16[:4] and c4[0][0] == INITIAL_CONFIG
        assert len({cfg for cfg, _ in c16}) == 16
    chosen = s16(cases, reward)
    assert backend.calls <= 16 * len(cases)
    for case, choice in zip(cases, chosen, strict=True):
        assert choice.llm_calls == 16
        best = max(reward(case, cfg) for cfg, _ in s16.candidates(case))
        assert reward(case, choice.config) == best >= reward(case, INITIAL_CONFIG)
    assert is_edit_method("search_16") and not is_edit_method("search_x")
    with pytest.raises(ValueError, match="trained policy"):
        edit_methods(["pmlm"], None)


def test_search_edits_the_start_config_it_is_given(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    from functools import reduce

    from promptenv.editing import apply_edit, edit_ids
    from promptenv.policy import policy_in_training
    from promptenv.prompts import fixed_config

    peer = fixed_config("peer")
    cases = obstetric_test_cases(default_tables, 3)
    reward = AnswerReward(
        LLMClient(EchoBackend(), workspace=tmp_path), PlanScorer(threshold=0.5), SHORT.params
    )
    search = PerPatientSearch(8, start=peer)
    for case in cases:
        cands = search.candidates(case)
        assert cands[0] == (peer, ()) and len({cfg for cfg, _ in cands}) == 8
        # every other candidate is peer with its trace of edits applied
        for cfg, trace in cands[1:]:
            assert 1 <= len(trace) <= search.max_edits
            assert reduce(apply_edit, edit_ids(trace), peer) == cfg
    chosen = search(cases, reward)
    for case, choice in zip(cases, chosen, strict=True):
        assert choice.llm_calls == 8
        assert reward(case, choice.config) >= reward(case, peer)
    # the evaluation's search starts where the policy does
    policy = policy_in_training(FirstEdit(), peer, 3)
    made = edit_methods(["search_4", "search_last_4"], policy)
    assert all(isinstance(m, PerPatientSearch) and m.start == peer for m in made.values())
    alone = edit_methods(["search_4"], None)["search_4"]
    assert isinstance(alone, PerPatientSearch) and alone.start == INITIAL_CONFIG


def test_search_on_the_last_known_plan_never_sees_the_next_plan(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    cases = obstetric_test_cases(default_tables, 4)
    # and a patient with no plan before her index time
    first = cases[0]
    no_plan = dataclasses.replace(
        first,
        encounter_id="no-earlier-plan",
        context=dataclasses.replace(
            first.context, reference_plans=first.context.reference_plans.iloc[0:0]
        ),
    )
    cases.append(no_plan)
    plans = default_tables["reference_plans"]
    reward = AnswerReward(
        LLMClient(EchoBackend(), workspace=tmp_path), PlanScorer(threshold=0.5), SHORT.params
    )
    search = PerPatientSearch(4, target="last_plan")
    chosen = search(cases, reward)
    assert last_known_plan(no_plan) is None
    assert (chosen[-1].config, chosen[-1].llm_calls) == (INITIAL_CONFIG, 0)
    for case, choice in zip(cases[:-1], chosen[:-1], strict=True):
        known = last_known_plan(case)
        earlier = plans[
            (plans["patient_id"] == case.context.patient["patient_id"])
            & (plans["time"] <= case.context.index_time)
            & (plans["n_items"] > 0)
        ]
        last = earlier.sort_values(["time", "encounter_id"]).iloc[-1]
        assert known is not None and known[1] == last["plan_text"]
        assert last["encounter_id"] != case.context.index["next_encounter_id"]
        scored = search.scored_case(case)
        assert scored is not None and scored.reference_items == known[0]
        best = max(reward(scored, cfg) for cfg, _ in search.candidates(case))
        assert choice.llm_calls == 4 and reward(scored, choice.config) == best
        # scoring against the last plan did not overwrite the case's own scores
        answered = reward.answer(case, choice.config)
        own = reward.scorer.score_many(
            [answered.answer], [list(case.reference_items)], [case.plan_text]
        )[0]
        assert answered.score == own
    assert is_edit_method("search_last_16") and not is_edit_method("search_last_x")
    assert isinstance(edit_methods(["search_last_4"], None)["search_last_4"], PerPatientSearch)


def test_evaluation_compares_edit_methods_with_their_llm_calls(
    trained: tuple[TrainedPolicy, LLMClient, EchoBackend],
    default_tables: dict[str, pd.DataFrame],
    tmp_path: Path,
) -> None:
    result, _, _ = trained
    start = result.policy.info.start.method
    fixed = list(dict.fromkeys(["general", "pmlm_initial", start, "oracle"]))
    client = LLMClient(EchoBackend(), workspace=tmp_path)
    said: list[str] = []
    evaluation = evaluate_methods(
        client,
        default_tables,
        history_signals(default_tables),  # type: ignore[arg-type]
        fixed,
        EvalSettings(n_obstetric=4, n_adult=3, n_calibration=4, bootstrap=50),
        progress=said.append,
        edit_methods=edit_methods(["pmlm", "random_edits", "search_4"], result.policy),
    )
    # the search's own answers are followed, not only the final ones
    assert any(line.startswith("search_4: answers to choose from: ") for line in said), said
    table = evaluation.table
    assert set(table["method"]) == {
        *fixed,
        "random_edits",
        "pmlm",
        "search_4",
    }
    calls = table.set_index(["subset", "method"])["llm_calls_per_patient"]
    assert calls[("obstetric", "search_4")] == 4 and calls[("obstetric", "pmlm")] == 0
    res = evaluation.results.pivot_table(index="encounter_id", columns="method", values="reward")
    # search tries the policy's start config first, so it never does worse than that prompt on
    # the patient it searched for
    assert (res["search_4"] >= res[start] - 1e-9).all()
    prov = evaluation.results
    assert len(prov[prov["method"] == "pmlm"]) == len(res)


def test_policy_json_keeps_its_keys_and_reads_back_into_the_same_info(
    trained: tuple[TrainedPolicy, LLMClient, EchoBackend],
) -> None:
    """Workspaces trained before `PolicyInfo` existed hold the same keys: they still load."""
    result, _, _ = trained
    saved = json.loads((result.path / "policy.json").read_text())
    assert set(saved) >= {
        "settings",
        "edit_space_version",
        "edits",
        "k_ladder",
        "initial_config",
        "trained_with",
        "training",
        "version",
    }
    assert set(saved["training"]) >= {
        "timesteps",
        "episodes",
        "llm_calls",
        "answers",
        "client_cache_hits",
        "client_cache_misses",
        "cache_hit_rate",
        "stopped_by_budget",
        "validation_curve",
        "final_validation_reward",
        "kept_timesteps",
        "kept_validation_reward",
        "falls_back_to_start",
        "llm_calls_to_kept_validation_reward",
        "llm_calls_to_final_validation_reward",
        "seconds",
    }
    assert set(saved["trained_with"]) >= {"llm", "threshold", "calibration", "data_hash"}
    assert set(saved["start"]) == {"method", "config", "validation_rewards"}
    info = PolicyInfo.from_json(saved)
    assert info == load_policy(result.path).info == result.policy.info
    assert json.loads(json.dumps(info.to_json(), default=str)) == saved
    # a file from before the start was chosen: episodes started from the initial config
    old = {k: v for k, v in saved.items() if k != "start"}
    old["training"] = {
        **{k: v for k, v in saved["training"].items() if k != "falls_back_to_start"},
        "falls_back_to_initial": True,
    }
    legacy = PolicyInfo.from_json(old)
    assert legacy.start.config == INITIAL_CONFIG and legacy.training.falls_back_to_start


def test_a_policy_that_beats_no_fixed_prompt_falls_back_to_the_best_one(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    """Episodes start from the fixed config that does best on validation (here peer-only, the
    only prompts this backend answers well), and a policy that beats it on validation keeps
    it, not the hand-written initial config."""
    from promptenv.prompts import CONFIG_METHODS, fixed_config

    peer = fixed_config("peer")
    result = train_tiny(default_tables, peer, tmp_path)
    start = result.policy.info.start
    assert set(start.validation_rewards) == set(CONFIG_METHODS)
    assert start.method == "peer" and start.config == peer
    assert start.validation_rewards["peer"] > start.validation_rewards["pmlm_initial"]
    assert result.policy.info.training.kept_validation_reward <= 0
    assert result.policy.falls_back_to_start
    reloaded = load_policy(tmp_path / "p")
    cases = tiny_cases(default_tables)
    assert reloaded.edit_many(cases) == [(peer, [])] * len(cases)
    prompts = reloaded.prompts(cases[:2])
    assert [p.provenance["start"] for p in prompts] == ["peer", "peer"]
    assert "keeps that prompt" in training_summary(reloaded)


@pytest.mark.parametrize(
    ("gains", "patients", "falls_back"),
    [
        # a positive mean that one patient's luck makes: not beyond the interval
        ([0.9, -0.3, 0.6, -0.4, 0.5, -0.2], ["a", "b", "c", "d", "e", "f"], True),
        # every patient gains: beyond it
        ([0.3, 0.2, 0.4, 0.25, 0.35, 0.3], ["a", "b", "c", "d", "e", "f"], False),
        # two encounters of one patient are one draw: no interval, so no edit
        ([0.3, 0.4], ["a", "a"], True),
    ],
)
def test_a_validation_gain_within_its_interval_falls_back_to_the_start_prompt(
    monkeypatch: pytest.MonkeyPatch, gains: list[float], patients: list[str], falls_back: bool
) -> None:
    import promptenv.policy as policy_module
    from promptenv.policy import keep_checkpoint
    from promptenv.policy_callbacks import TrainingLog

    log = TrainingLog()
    log.record(ValidationPoint(64.0, 10.0, float(np.mean(gains))), None)
    said: list[str] = []
    monkeypatch.setattr(
        policy_module,
        "validation_gains",
        lambda *_a, **_k: (np.array(gains), np.array(patients, dtype=object)),
    )
    kept = keep_checkpoint(None, log, TINY, None, None, said.append)  # type: ignore[arg-type]
    assert kept.falls_back is falls_back
    assert kept.point == log.validation[-1]
    low, high = kept.interval or (np.nan, np.nan)
    if len(set(patients)) < 2:
        assert np.isnan(low) and "not beyond" in said[-1]
    else:
        assert low <= np.mean(gains) <= high
        assert (low > 0) is not falls_back
        assert ("not beyond" in said[-1]) is falls_back
    # without the interval rule, a positive mean keeps the edits
    loose = dataclasses.replace(TINY, require_interval=False)
    assert not keep_checkpoint(None, log, loose, None, None, said.append).falls_back  # type: ignore[arg-type]


def _held_out(gains: np.ndarray, patients: list[str]) -> object:
    from promptenv.reward_model import OutOfFold

    return OutOfFold(
        gains,
        np.array(patients, dtype=object),
        tuple(f"e{i}" for i in range(len(gains))),
        np.ones(len(gains), dtype=bool),
    )


@pytest.mark.parametrize(("held_mean", "falls_back"), [(0.05, False), (0.0, True)])
def test_held_out_training_patients_decide_the_fall_back_with_the_validation_ones(
    monkeypatch: pytest.MonkeyPatch, held_mean: float, falls_back: bool
) -> None:
    """Six validation patients alone leave a +0.18 mean within its interval; 60 out-of-fold
    training patients gaining +0.05 each, give or take 0.02, carry it beyond, and 60 who
    gain nothing on average do not."""
    import promptenv.policy as policy_module
    from promptenv.policy import keep_checkpoint
    from promptenv.policy_callbacks import TrainingLog

    gains = [0.9, -0.3, 0.6, -0.4, 0.5, -0.2]
    log = TrainingLog()
    log.record(ValidationPoint(64.0, 10.0, float(np.mean(gains))), None)
    rng = np.random.default_rng(0)
    held = held_mean + rng.uniform(-0.02, 0.02, 120)
    log.held_out = _held_out(held, [f"t{i // 2}" for i in range(120)])
    monkeypatch.setattr(
        policy_module,
        "validation_gains",
        lambda *_a, **_k: (np.array(gains), np.array(list("abcdef"), dtype=object)),
    )
    said: list[str] = []
    kept = keep_checkpoint(None, log, TINY, None, None, said.append)  # type: ignore[arg-type]
    assert kept.falls_back is falls_back
    assert kept.interval is not None and kept.interval[0] < 0  # validation alone: within
    assert kept.out_of_fold == (pytest.approx(float(held.mean())), 120, 60)
    assert kept.pooled is not None and (kept.pooled[0] > 0) is not falls_back
    assert "out of fold" in said[-1] and ("not beyond" in said[-1]) is falls_back


def test_a_policy_below_its_start_on_validation_falls_back_and_records_its_out_of_fold_gain() -> (
    None
):
    from promptenv.policy import keep_checkpoint
    from promptenv.policy_callbacks import TrainingLog

    log = TrainingLog()
    log.record(ValidationPoint(64.0, 10.0, -0.02), None)
    log.held_out = _held_out(np.array([0.1, 0.3, 0.2]), ["a", "b", "b"])
    said: list[str] = []
    kept = keep_checkpoint(None, log, TINY, None, None, said.append)  # type: ignore[arg-type]
    assert kept.falls_back and kept.pooled is None
    assert kept.out_of_fold == (pytest.approx(0.2), 3, 2)
    assert "no checkpoint beat" in said[-1] and "out of fold +0.2000" in said[-1]
