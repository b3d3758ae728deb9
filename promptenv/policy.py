"""Train a prompt-editing policy with MaskablePPO, save it, and apply it with no LLM call.

Training (`train_policy`): episodes are TRAIN patients' index encounters (a
seeded sample, ``obstetric_share`` of them obstetric, at most two per patient);
answers come through the cached `LLMClient`; the matching threshold is
calibrated on validation encounters exactly as `pmlm evaluate` does (same
encounters, same cut); `MaskableEvalCallback` scores the deterministic policy on
VALIDATION encounters every ``eval_freq`` steps. Training stops at
``timesteps`` or when the LLM-call budget ``max_llm_calls`` is spent (counted
as answers not already in the cache; the run ends at the first step that
reaches it, so it may exceed it by the two answers of that step). The policy
kept is the one with the best validation reward (``keep_best``): with few
training patients PPO can drift past its best; validation patients choose. The
initial prompt itself competes (its validation reward over itself is 0): when no
checkpoint beats it, the saved policy makes no edit (``falls_back_to_initial``),
so a short or unlucky training run never ships prompts worse than the initial
ones on validation.

The saved policy (``models/policy/policy.zip`` + ``policy.json``) carries its
settings, the edit space, and what it was trained with: the data and recommender
versions the caller passes, the LLM and its generation settings, the threshold;
and what training cost: LLM calls, cache hit rate, the validation curve, and the
LLM calls it took to first reach the final validation reward.

Applying (`Policy.edit_many`) needs only the patient's context and signals: the
policy picks edits with masks until it stops; the edit trace is provenance.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.workspace import Workspace, atomic_write_bytes
from promptenv.editing import (
    EDIT_SPACE_VERSION,
    EDITS,
    K_LADDER,
    STOP,
    EditCase,
    apply_edit,
    build_cases,
    config_features,
    edit_mask,
)
from promptenv.env import AnswerReward, PromptEditEnv
from promptenv.evaluate import (
    EVAL_PARAMS,
    EvalSettings,
    calibrate_threshold,
    pick_encounters,
    references,
)
from promptenv.fragments import PatientSignals
from promptenv.llm import GenerationParams, LLMClient
from promptenv.llm.client import progress_lines
from promptenv.prompts import INITIAL_CONFIG, Prompt, PromptConfig, assemble
from promptenv.reward import PlanScorer

Progress = Callable[[str], None]
SignalsFor = Callable[[Sequence[str]], Mapping[str, PatientSignals]]
POLICY_FILE = "policy.zip"
INFO_FILE = "policy.json"


def policy_dir(workspace: Workspace) -> Path:
    return workspace.models_dir / "policy"


@dataclass(frozen=True)
class PolicySettings:
    """What the policy trains on, for how long, with which PPO settings and LLM budget."""

    n_train: int = 96
    obstetric_share: float = 0.5
    n_validation: int = 16
    max_per_patient: int = 2
    max_edits: int = 6
    timesteps: int = 2048
    n_steps: int = 128
    batch_size: int = 64
    n_epochs: int = 10
    learning_rate: float = 1e-3
    ent_coef: float = 0.01
    gamma: float = 1.0
    eval_freq: int = 512
    max_llm_calls: int = 800
    #: keep the weights that scored best on validation (early stopping), not the last ones
    keep_best: bool = True
    n_calibration: int = 20
    seed: int = 0
    params: GenerationParams = field(default_factory=lambda: EVAL_PARAMS)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = asdict(self.params)
        return d


def pick_training_encounters(
    index: pd.DataFrame, split: str, n: int, obstetric_share: float, max_per_patient: int, seed: int
) -> pd.DataFrame:
    """A seeded sample of ``split`` index encounters, ``obstetric_share`` of them obstetric."""
    pool = index[index["split"] == split]
    rng = np.random.default_rng(seed)
    shuffled = pool.iloc[rng.permutation(len(pool))]
    capped = shuffled[shuffled.groupby("patient_id").cumcount() < max_per_patient]
    n_ob = round(n * obstetric_share)
    ob = capped[capped["is_obstetric"]].head(n_ob)
    rest = capped[~capped["encounter_id"].isin(ob["encounter_id"])].head(n - len(ob))
    return pd.concat([ob, rest]).reset_index(drop=True)


@dataclass
class TrainingLog:
    """What training cost and how validation reward moved."""

    episodes: int = 0
    timesteps: int = 0
    episode_rewards: list[float] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    stopped_by_budget: bool = False
    best: dict[str, float] = field(default_factory=dict)
    best_weights: Any = None


def _monitor(
    reward: AnswerReward,
    log: TrainingLog,
    settings: PolicySettings,
    progress: Progress | None,
    show_bar: bool,
) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm import tqdm

    lines_every = 16 * max(1, settings.timesteps // 128)  # about 8 lines per run

    class Monitor(BaseCallback):
        """Progress bar with running reward and cache hit rate; stops at the LLM budget."""

        def _on_training_start(self) -> None:
            self.bar = tqdm(
                total=settings.timesteps, desc="policy", unit="step", disable=not show_bar
            )

        def _on_step(self) -> bool:
            self.bar.update(1)
            log.timesteps = self.num_timesteps
            for done, info in zip(self.locals["dones"], self.locals["infos"], strict=True):
                if done and "final_reward" in info:
                    log.episodes += 1
                    log.episode_rewards.append(float(self.locals["rewards"][0]))
            if log.episodes and self.n_calls % 16 == 0:
                hit = 1 - reward.llm_calls / max(1, reward.answers)
                recent = np.mean(log.episode_rewards[-32:])
                self.bar.set_postfix(
                    reward=f"{recent:+.3f}", cache=f"{hit:.0%}", llm_calls=reward.llm_calls
                )
                if progress and not show_bar and self.n_calls % lines_every == 0:
                    # the same figures as lines, for logs (the flows show no bar)
                    progress(
                        f"step {self.num_timesteps}/{settings.timesteps}: running reward over "
                        f"initial {recent:+.3f}, cache hit rate {hit:.0%}, "
                        f"{reward.llm_calls} LLM calls"
                    )
            if reward.llm_calls >= settings.max_llm_calls:
                log.stopped_by_budget = True
                if progress:
                    progress(f"LLM-call budget of {settings.max_llm_calls} reached: stopping")
                return False
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    return Monitor()


def _after_eval(reward: AnswerReward, log: TrainingLog, progress: Progress | None) -> Any:
    import copy

    from stable_baselines3.common.callbacks import BaseCallback

    class AfterEval(BaseCallback):
        def _on_step(self) -> bool:
            parent: Any = self.parent  # the MaskableEvalCallback that just evaluated
            assert parent is not None
            point = {
                "timesteps": float(parent.num_timesteps),
                "llm_calls": float(reward.llm_calls),
                "validation_reward": float(parent.last_mean_reward),
            }
            if not log.validation or point["validation_reward"] > log.best["validation_reward"]:
                log.best = point
                log.best_weights = copy.deepcopy(self.model.policy.state_dict())
            log.validation.append(point)
            if progress:
                progress(
                    f"validation at {parent.num_timesteps} steps: reward over initial "
                    f"{parent.last_mean_reward:+.4f} ({reward.llm_calls} LLM calls so far)"
                )
            return True

    return AfterEval()


def calls_to_final(validation: Sequence[Mapping[str, float]], tolerance: float = 0.005) -> float:
    """LLM calls spent when validation reward first came within ``tolerance`` of its final value."""
    if not validation:
        return float("nan")
    final = validation[-1]["validation_reward"]
    for point in validation:
        if point["validation_reward"] >= final - tolerance:
            return point["llm_calls"]
    return validation[-1]["llm_calls"]


@dataclass
class Policy:
    """A trained editing policy and what it was trained with (``info``)."""

    model: Any
    info: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.info.get("version", ""))

    @property
    def max_edits(self) -> int:
        return int(self.info["settings"]["max_edits"])

    @property
    def falls_back_to_initial(self) -> bool:
        """True when no trained checkpoint beat the initial prompt on validation: no edits."""
        return bool(self.info.get("training", {}).get("falls_back_to_initial", False))

    def edit(self, case: EditCase) -> tuple[PromptConfig, list[str]]:
        """The policy's edits of the initial config for one case (no LLM call)."""
        config, trace = INITIAL_CONFIG, list[str]()
        if self.falls_back_to_initial:
            return config, trace
        last: int | None = None
        for edits in range(self.max_edits + 1):
            mask = edit_mask(config, last)
            if edits >= self.max_edits:
                mask[:] = False
                mask[STOP] = True
            obs = np.concatenate(
                [case.features, config_features(config, edits, self.max_edits)]
            ).astype(np.float32)
            action, _ = self.model.predict(obs, action_masks=mask, deterministic=True)
            a = int(action)
            if a == STOP:
                break
            config = apply_edit(config, a)
            last = a
            trace.append(EDITS[a].label)
        return config, trace

    def edit_many(self, cases: Sequence[EditCase]) -> list[tuple[PromptConfig, list[str]]]:
        return [self.edit(c) for c in cases]

    def prompts(self, cases: Sequence[EditCase], method: str = "pmlm") -> list[Prompt]:
        """Refined prompts, with the edit trace and the policy version in their provenance."""
        out = []
        for case, (config, trace) in zip(cases, self.edit_many(cases), strict=True):
            p = assemble(case.context, case.signals, config, method)
            provenance = {**p.provenance, "policy": self.version, "edits": trace}
            out.append(Prompt(p.method, p.system, p.user, p.tokens, p.config, provenance))
        return out


def training_summary(policy: Policy) -> str:
    """One line on what training did and what was kept, for logs and the command line."""
    training = policy.info["training"]
    kept = (
        "no checkpoint beat the initial prompt on validation, so it keeps the initial prompt"
        if policy.falls_back_to_initial
        else f"kept the weights of step {training['kept_timesteps']:.0f}"
    )
    return (
        f"policy {policy.version}: {training['episodes']} episodes, {training['llm_calls']} LLM "
        f"calls, cache hit rate {training['cache_hit_rate']:.0%}; {kept} (validation reward "
        f"over initial {training['kept_validation_reward']:+.4f}; last "
        f"{training['final_validation_reward']:+.4f}); {training['seconds']:.0f} s"
    )


def save_policy(model: Any, info: Mapping[str, Any], folder: Path) -> Policy:
    """Write policy.zip and policy.json (atomically); the version is the zip's sha256 prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".policy-tmp.zip"
    model.save(tmp)
    data = tmp.read_bytes()
    tmp.unlink()
    digest = hashlib.sha256(data)
    if info.get("training", {}).get("falls_back_to_initial"):
        digest.update(b"falls back to the initial prompt")  # same weights, other behaviour
    version = digest.hexdigest()[:12]
    full = {**info, "version": version}
    atomic_write_bytes(folder / POLICY_FILE, data)
    atomic_write_bytes(folder / INFO_FILE, json.dumps(full, indent=2, default=str).encode())
    return Policy(model, full)


def load_policy(folder: Path) -> Policy:
    """Load a policy saved by `train_policy` (``models/policy`` of a workspace)."""
    from sb3_contrib import MaskablePPO

    zip_path, info_path = folder / POLICY_FILE, folder / INFO_FILE
    if not zip_path.exists() or not info_path.exists():
        raise FileNotFoundError(
            f"no trained policy in {folder}: run `pmlm policy train` (or `pmlm run`) first"
        )
    info = json.loads(info_path.read_text())
    if (
        info.get("edit_space_version") != EDIT_SPACE_VERSION
        or info.get("edits") != [e.label for e in EDITS]
        or info.get("k_ladder") != list(K_LADDER)
    ):
        raise ValueError(
            f"the policy in {folder} was trained on another edit space: retrain it with `pmlm policy train`"
        )
    return Policy(MaskablePPO.load(zip_path, device="cpu"), info)


@dataclass(frozen=True)
class TrainedPolicy:
    policy: Policy
    log: TrainingLog
    path: Path


def train_policy(
    client: LLMClient,
    tables: Mapping[str, pd.DataFrame],
    signals_for: SignalsFor,
    folder: Path,
    settings: PolicySettings | None = None,
    versions: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    show_bar: bool = True,
) -> TrainedPolicy:
    """Train MaskablePPO on training encounters, validate on validation encounters, save to ``folder``.

    ``versions`` (data fingerprint, recommender, ...) is stored with the policy.
    """
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.monitor import Monitor

    settings = settings or PolicySettings()
    say = progress or (lambda _m: None)
    started = time.perf_counter()
    index = tables["index_encounters"]
    train_rows = pick_training_encounters(
        index,
        "train",
        settings.n_train,
        settings.obstetric_share,
        settings.max_per_patient,
        settings.seed,
    )
    val_rows = pick_training_encounters(
        index,
        "validation",
        settings.n_validation,
        settings.obstetric_share,
        settings.max_per_patient,
        settings.seed,
    )
    if train_rows.empty or val_rows.empty:
        raise ValueError(
            "training a policy needs train and validation index encounters; this workspace has "
            f"{len(train_rows)} and {len(val_rows)}: ingest a larger cohort"
        )
    # the same validation encounters and cut as `pmlm evaluate` with default settings
    eval_settings = EvalSettings(
        n_calibration=settings.n_calibration, params=settings.params, seed=0
    )
    calib_rows = pick_encounters(
        index,
        EvalSettings(
            split="validation",
            n_obstetric=settings.n_calibration // 2,
            n_adult=settings.n_calibration // 2,
            seed=0,
        ),
    )
    refs = references(tables, pd.concat([train_rows, val_rows, calib_rows]))
    from pipelines.index import ContextStore

    store = ContextStore(
        dict(tables),
        only_encounters=[
            *train_rows["encounter_id"],
            *val_rows["encounter_id"],
            *calib_rows["encounter_id"],
        ],
    )
    scorer = PlanScorer()
    say(f"calibrating the matching threshold on {len(calib_rows)} validation encounters")
    calibration = calibrate_threshold(client, store, calib_rows, refs, scorer, eval_settings)
    scorer.threshold = float(calibration["threshold"])
    say(
        f"threshold {scorer.threshold}; signals and features of {len(train_rows)} training and "
        f"{len(val_rows)} validation encounters"
    )
    train_cases = build_cases(tables, train_rows, signals_for, refs, store)
    val_cases = build_cases(tables, val_rows, signals_for, refs, store)
    reward = AnswerReward(client, scorer, settings.params)
    say(f"answers to the initial prompts of {len(train_cases) + len(val_cases)} encounters")
    reward.answer_many(
        [(c, INITIAL_CONFIG) for c in [*train_cases, *val_cases]],
        progress=progress_lines(say, "initial answers"),
    )
    env = PromptEditEnv(train_cases, reward, max_edits=settings.max_edits)
    eval_env = PromptEditEnv(val_cases, reward, max_edits=settings.max_edits, sequential=True)
    log = TrainingLog()
    model = MaskablePPO(
        "MlpPolicy",
        env,
        learning_rate=settings.learning_rate,
        n_steps=settings.n_steps,
        batch_size=settings.batch_size,
        n_epochs=settings.n_epochs,
        gamma=settings.gamma,
        ent_coef=settings.ent_coef,
        seed=settings.seed,
        device="cpu",
        verbose=0,
    )
    # no SB3 log folder: left to itself, `learn` makes an empty /tmp/SB3-<date> per run
    model.set_logger(Logger(folder=None, output_formats=[]))
    evaluation = MaskableEvalCallback(
        Monitor(eval_env),
        n_eval_episodes=len(val_cases),
        eval_freq=settings.eval_freq,
        deterministic=True,
        callback_after_eval=_after_eval(reward, log, say),
        verbose=0,
    )
    monitor = _monitor(reward, log, settings, say, show_bar)
    model.learn(total_timesteps=settings.timesteps, callback=CallbackList([monitor, evaluation]))
    if not log.validation or log.validation[-1]["timesteps"] < log.timesteps:
        _final_validation(model, eval_env, len(val_cases), reward, log, say)
        if log.validation[-1]["validation_reward"] > log.best.get("validation_reward", -np.inf):
            log.best, log.best_weights = log.validation[-1], None
    if settings.keep_best and log.best_weights is not None:
        # the policy kept is the one that did best on validation patients (early stopping)
        model.policy.load_state_dict(log.best_weights)
        say(
            f"keeping the policy of step {log.best['timesteps']:.0f} (validation reward over "
            f"initial {log.best['validation_reward']:+.4f}; last {log.validation[-1]['validation_reward']:+.4f})"
        )
    kept = log.best if settings.keep_best and log.best else log.validation[-1]
    falls_back = settings.keep_best and kept["validation_reward"] <= 0
    if falls_back:
        say(
            f"no checkpoint beat the initial prompt on validation (best "
            f"{kept['validation_reward']:+.4f}): the policy keeps the initial prompt (no edit)"
        )
    stats = client.cache_stats
    info = {
        "settings": settings.as_dict(),
        "edit_space_version": EDIT_SPACE_VERSION,
        "edits": [e.label for e in EDITS],
        "k_ladder": list(K_LADDER),
        "initial_config": INITIAL_CONFIG.as_dict(),
        "trained_with": {
            **dict(versions or {}),
            "llm": client.label,
            "threshold": scorer.threshold,
            "calibration": calibration,
            "train_encounters": len(train_cases),
            "validation_encounters": len(val_cases),
        },
        "training": {
            "timesteps": log.timesteps,
            "episodes": log.episodes,
            "llm_calls": reward.llm_calls,
            "answers": reward.answers,
            "client_cache_hits": stats.hits,
            "client_cache_misses": stats.misses,
            # answers served without a new LLM call (from memory or the client's cache)
            "cache_hit_rate": 1 - reward.llm_calls / max(1, reward.answers),
            "stopped_by_budget": log.stopped_by_budget,
            "validation_curve": log.validation,
            "final_validation_reward": log.validation[-1]["validation_reward"],
            "kept_timesteps": kept["timesteps"],
            "kept_validation_reward": kept["validation_reward"],
            "falls_back_to_initial": falls_back,
            "llm_calls_to_kept_validation_reward": kept["llm_calls"],
            "llm_calls_to_final_validation_reward": calls_to_final(log.validation),
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    policy = save_policy(model, info, folder)
    say(f"policy {policy.version} saved to {folder}")
    return TrainedPolicy(policy, log, folder)


def _final_validation(
    model: Any,
    env: PromptEditEnv,
    n: int,
    reward: AnswerReward,
    log: TrainingLog,
    say: Progress,
) -> None:
    """Score the final policy on the validation encounters (when the last eval was earlier)."""
    policy = Policy(model, {"settings": {"max_edits": env.max_edits}})
    total = 0.0
    for case, (config, _) in zip(env.cases, policy.edit_many(env.cases[:n]), strict=False):
        total += reward(case, config) - reward(case, env.initial)
    point = {
        "timesteps": float(log.timesteps),
        "llm_calls": float(reward.llm_calls),
        "validation_reward": total / max(1, n),
    }
    log.validation.append(point)
    say(
        f"final validation: reward over initial {point['validation_reward']:+.4f} "
        f"({reward.llm_calls} LLM calls)"
    )


__all__ = [
    "Policy",
    "PolicySettings",
    "TrainedPolicy",
    "TrainingLog",
    "calls_to_final",
    "load_policy",
    "pick_training_encounters",
    "policy_dir",
    "save_policy",
    "train_policy",
]
