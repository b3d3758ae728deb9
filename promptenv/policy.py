"""Train a prompt-editing policy with MaskablePPO, save it, and apply it with no LLM call.

Training (`train_policy`): episodes are TRAIN patients' index encounters (a
seeded sample, ``obstetric_share`` of them obstetric, at most two per patient);
answers come through the cached `LLMClient`; the matching threshold is the
caller's calibration (a workspace's, the one `pmlm evaluate` uses; see
`promptenv.calibration`); `MaskableEvalCallback` scores the deterministic policy on
VALIDATION encounters every ``eval_freq`` steps. Training stops at
``timesteps`` or when the LLM-call budget ``max_llm_calls`` is spent (counted
as answers not already in the cache; the run ends at the first step that
reaches it, so it may exceed it by the two answers of that step and by the
final validation's, at most one per validation encounter).

Episodes start from the best fixed config on VALIDATION encounters
(`choose_start`: the initial config, self-only and peer-only,
`promptenv.prompts.CONFIG_METHODS`); rewards are relative to it. The policy
kept is the one with the best validation reward (``keep_best``): with few
training patients PPO can drift past its best; validation patients choose. The
start config itself competes (its validation reward over itself is 0): when no
checkpoint beats it, the saved policy makes no edit (``falls_back_to_start``),
so a short or unlucky training run never ships prompts worse on validation
than the best fixed prompt.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from pipelines.index import ContextStore
from pipelines.workspace import publishing_dir
from promptenv.calibration import Calibration, calibrated_scorer
from promptenv.editing import (
    EDITS,
    STOP,
    EditCase,
    allowed_mask,
    apply_edit,
    build_cases,
    observation,
    step_mask,
)
from promptenv.encounters import references
from promptenv.env import AnswerReward, PromptEditEnv
from promptenv.fragments import PatientSignals
from promptenv.llm import LLMClient
from promptenv.llm.client import progress_lines
from promptenv.policy_info import (
    INFO_FILE,
    POLICY_FILE,
    PolicyInfo,
    PolicySettings,
    StartConfig,
    TrainedWith,
    TrainingSummary,
    ValidationPoint,
    policy_dir,
    policy_info_path,
)
from promptenv.prompts import (
    CONFIG_METHODS,
    INITIAL_CONFIG,
    Prompt,
    PromptConfig,
    assemble,
    fixed_config,
)
from recsys.type_aliases import Progress, Tick

if TYPE_CHECKING:
    from promptenv.policy_callbacks import TrainingLog

SignalsFor = Callable[[Sequence[str]], Mapping[str, PatientSignals]]


def pick_training_encounters(
    index: pd.DataFrame, split: str, n: int, obstetric_share: float, max_per_patient: int, seed: int
) -> pd.DataFrame:
    """A seeded sample of ``split`` index encounters, at most ``max_per_patient`` of a patient,
    ``obstetric_share`` of them obstetric (fewer only when the split has fewer under the cap).

    The obstetric encounters are drawn first, each patient's cap counting them only; the
    rest fill the cap's remaining places. Capping the whole split first would spend the
    places of most patients with a pregnancy on their far more numerous other encounters
    (on the default cohort, 31 obstetric encounters of 96 asked)."""
    pool = index[index["split"] == split]
    rng = np.random.default_rng(seed)
    shuffled = pool.iloc[rng.permutation(len(pool))]
    obstetric = shuffled[shuffled["is_obstetric"].astype(bool)]
    ob = obstetric[obstetric.groupby("patient_id").cumcount() < max_per_patient].head(
        round(n * obstetric_share)
    )
    others = shuffled[~shuffled["encounter_id"].isin(ob["encounter_id"])]
    taken = others["patient_id"].map(ob["patient_id"].value_counts()).fillna(0)
    places = others[others.groupby("patient_id").cumcount() + taken < max_per_patient]
    rest = places.head(n - len(ob))
    return pd.concat([ob, rest]).reset_index(drop=True)


def calls_to_final(validation: Sequence[ValidationPoint], tolerance: float = 0.005) -> float:
    """LLM calls spent when validation reward first came within ``tolerance`` of its final value."""
    if not validation:
        return float("nan")
    final = validation[-1].validation_reward
    for point in validation:
        if point.validation_reward >= final - tolerance:
            return point.llm_calls
    return validation[-1].llm_calls


@dataclass(frozen=True)
class Policy:
    """A trained editing policy (``model``, a MaskablePPO) and what it was trained with (``info``)."""

    model: Any
    info: PolicyInfo = field(default_factory=PolicyInfo)

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def max_edits(self) -> int:
        return self.info.settings.max_edits

    @property
    def allowed_edits(self) -> tuple[str, ...]:
        """The edits it may make, by label (empty: every edit)."""
        return self.info.settings.edits

    @property
    def start(self) -> PromptConfig:
        """The config its edits start from (the best fixed config on validation)."""
        return self.info.start.config

    @property
    def falls_back_to_start(self) -> bool:
        """True when no trained checkpoint beat the start config on validation: no edits."""
        return self.info.training.falls_back_to_start

    def edit(self, case: EditCase, deterministic: bool = True) -> tuple[PromptConfig, list[str]]:
        """The policy's edits of the start config for one case (no LLM call); the same
        observations and masks as the environment it was trained in (``deterministic=False``:
        edits sampled from the policy, as in training's rollouts)."""
        config, trace = self.start, list[str]()
        if self.falls_back_to_start:
            return config, trace
        last: int | None = None
        allowed = allowed_mask(self.allowed_edits)
        for edits in range(self.max_edits + 1):
            mask = step_mask(config, last, edits, self.max_edits, allowed)
            obs = observation(case.features, config, edits, self.max_edits)
            action, _ = self.model.predict(obs, action_masks=mask, deterministic=deterministic)
            a = int(action)
            if a == STOP:
                break
            config = apply_edit(config, a)
            last = a
            trace.append(EDITS[a].label)
        return config, trace

    def edit_many(
        self, cases: Sequence[EditCase], deterministic: bool = True
    ) -> list[tuple[PromptConfig, list[str]]]:
        return [self.edit(c, deterministic) for c in cases]

    def prompts(self, cases: Sequence[EditCase], method: str = "pmlm") -> list[Prompt]:
        """Refined prompts, with the edit trace and the policy version in their provenance."""
        out = []
        for case, (config, trace) in zip(cases, self.edit_many(cases), strict=True):
            p = assemble(case.context, case.signals, config, method)
            provenance = {
                **p.provenance,
                "policy": self.version,
                "start": self.info.start.method,
                "edits": trace,
            }
            out.append(Prompt(p.method, p.system, p.user, p.tokens, p.config, provenance))
        return out


def policy_in_training(
    model: Any, start: PromptConfig, max_edits: int, edits: Sequence[str] = ()
) -> Policy:
    """The network being trained (``model``) as a `Policy` that edits ``start`` (within
    ``edits``, by label; empty: every edit): it edits as the saved policy will (nothing of
    training's record is needed for that)."""
    return Policy(
        model,
        PolicyInfo(
            settings=PolicySettings(max_edits=max_edits, edits=tuple(edits)),
            start=StartConfig(config=start),
        ),
    )


def validation_gains(
    model: Any,
    env: PromptEditEnv,
    reward: AnswerReward,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.object_]]:
    """Per encounter of ``env`` (validation): the deterministic policy's reward minus the
    start config's, and the encounter's patient.

    Each encounter's edited config and start config are answered in one batch, in that order
    (``progress`` follows its LLM calls); the start configs' answers are usually in the
    reward's memory already (`choose_start` answered them)."""
    policy = policy_in_training(model, env.initial, env.max_edits, env.allowed)
    pairs = [
        pair
        for case, (config, _) in zip(env.cases, policy.edit_many(env.cases), strict=True)
        for pair in ((case, config), (case, env.initial))
    ]
    answered = reward.answer_many(pairs, progress=progress)
    gains = np.array(
        [
            edited.score.reward - start.score.reward
            for edited, start in zip(answered[::2], answered[1::2], strict=True)
        ],
        dtype=float,
    )
    patients = np.array([str(c.context.patient["patient_id"]) for c in env.cases], dtype=object)
    return gains, patients


def validate_policy(
    model: Any,
    env: PromptEditEnv,
    reward: AnswerReward,
    timesteps: int,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationPoint:
    """The deterministic policy's mean LLM reward over ``env``'s start config on ``env``'s
    (validation) encounters (`validation_gains`), as the validation point at ``timesteps``
    PPO steps. Used by `learn` (the final validation) and by `promptenv.reward_model` (each
    round's)."""
    gains, _ = validation_gains(model, env, reward, progress)
    total = sum(gains.tolist())  # left to right, as the validation callbacks add
    return ValidationPoint(
        float(timesteps), float(reward.llm_calls), total / max(1, len(env.cases))
    )


def training_summary(policy: Policy) -> str:
    """One line on what training did and what was kept, for logs and the command line."""
    training, start = policy.info.training, policy.info.start.method
    low, high = training.kept_validation_low, training.kept_validation_high
    interval = "" if low is None or high is None else f" [{low:+.4f}, {high:+.4f}]"
    where = "validation"
    if training.out_of_fold_gain is not None:
        where = "validation and out of fold"
        both = (
            ""
            if training.pooled_low is None or training.pooled_high is None
            else f", pooled with validation [{training.pooled_low:+.4f}, {training.pooled_high:+.4f}]"
        )
        interval += (
            f"; out of fold {training.out_of_fold_gain:+.4f} on "
            f"{training.out_of_fold_encounters} training encounters{both}"
        )
    kept = (
        f"no checkpoint beat the start prompt ({start}) on {where} beyond noise, so it "
        "keeps that prompt"
        if policy.falls_back_to_start
        else f"kept the weights of step {training.kept_timesteps:.0f}"
    )
    return (
        f"policy {policy.version}: {training.episodes} episodes from the {start} prompt, "
        f"{training.llm_calls} LLM calls, cache hit rate {training.cache_hit_rate:.0%}; {kept} "
        f"(validation reward over {start} {training.kept_validation_reward:+.4f}{interval}; "
        f"last {training.final_validation_reward:+.4f}); {training.seconds:.0f} s"
    )


# --------------------------------------------------------------------------- saving


def _weights(model: Any, folder: Path) -> bytes:
    """The model's weights as the bytes of an SB3 zip."""
    tmp = folder / ".policy-tmp.zip"
    model.save(tmp)
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def _version(weights: bytes, info: PolicyInfo) -> str:
    """The sha256 prefix of the weights, the start config and the fall-back flag (the same
    weights from another start, or falling back, behave otherwise)."""
    digest = hashlib.sha256(weights)
    if info.start.config != INITIAL_CONFIG:
        digest.update(json.dumps(info.start.config.as_dict(), sort_keys=True).encode())
    if info.training.falls_back_to_start:
        digest.update(b"falls back to the start prompt")
    return digest.hexdigest()[:12]


def save_policy(model: Any, info: PolicyInfo, folder: Path) -> Policy:
    """Write policy.zip and policy.json; the version is the zip's sha256 prefix (with the
    start config and the fall-back flag: `_version`).

    The folder is published whole (`publishing_dir`: fsynced, then swapped in; inside a
    workspace transaction, with its other files): a kill leaves the old policy or the new
    one, never new weights beside the old ``policy.json``.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with publishing_dir(folder) as new:
        weights = _weights(model, new)
        full = replace(info, version=_version(weights, info))
        (new / POLICY_FILE).write_bytes(weights)
        policy_info_path(new).write_bytes(
            json.dumps(full.to_json(), indent=2, default=str).encode()
        )
    return Policy(model, full)


def read_policy_info(folder: Path) -> PolicyInfo:
    """The ``policy.json`` of the policy in ``folder``; it must match this code's edit space."""
    info = PolicyInfo.from_json(json.loads(policy_info_path(folder).read_text()))
    if not info.same_edit_space:
        raise ValueError(
            f"the policy in {folder} was trained on another edit space: retrain it with `pmlm policy train`"
        )
    return info


#: The member of an SB3 zip that holds the policy network's weights (a torch state dict).
WEIGHTS_MEMBER = "policy.pth"


def load_weights(zip_path: Path) -> Any:
    """The policy network of ``zip_path``, rebuilt from this code and the zip's weights alone.

    SB3's own ``load`` unpickles the zip's ``:serialized:`` entries (classes, spaces,
    schedules), so a doctored zip would run code. Here nothing of the zip is unpickled:
    the network is built from this code's observation and action spaces and the
    default MlpPolicy, and ``policy.pth`` is read with ``torch.load(weights_only=True)``,
    which accepts tensors and plain containers only. A zip that holds anything else,
    or weights of another shape, is refused (`TamperedFileError`), nothing of it run.
    """
    import io
    import pickle
    import zipfile

    import gymnasium as gym
    import torch
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

    from pipelines.integrity import TamperedFileError
    from promptenv.editing import N_CONFIG_FEATURES, N_EDITS, N_PATIENT_FEATURES

    remedy = "delete it and retrain with `pmlm policy train` (or `pmlm run`)"
    try:
        with zipfile.ZipFile(zip_path) as archive:
            raw = archive.read(WEIGHTS_MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise TamperedFileError(f"{zip_path} is not a policy PMLM saved ({exc}): {remedy}") from exc
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise TamperedFileError(
            f"{zip_path} holds more than weights in {WEIGHTS_MEMBER}, so it is not loaded "
            f"(it could run code): {remedy}"
        ) from exc
    network = MaskableActorCriticPolicy(
        gym.spaces.Box(0.0, 1.0, shape=(N_PATIENT_FEATURES + N_CONFIG_FEATURES,), dtype=np.float32),
        gym.spaces.Discrete(N_EDITS),
        lr_schedule=lambda _: 0.0,
    )
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise TamperedFileError(
            f"{zip_path}'s weights do not fit this version's policy network: {remedy}"
        ) from exc
    network.set_training_mode(False)
    return network


def load_policy(folder: Path) -> Policy:
    """Load a policy saved by `train_policy` (``models/policy`` of a workspace): its
    ``policy.json`` and its network's weights (`load_weights`: nothing unpickled)."""
    zip_path = folder / POLICY_FILE
    if not zip_path.exists() or not policy_info_path(folder).exists():
        raise FileNotFoundError(
            f"no trained policy in {folder}: run `pmlm policy train` (or `pmlm run`) first"
        )
    from pipelines.integrity import TamperedFileError

    info = read_policy_info(folder)
    if _version(zip_path.read_bytes(), info) != info.version:
        raise TamperedFileError(
            f"{zip_path} is not the policy {info.version} that {policy_info_path(folder)} "
            "describes (replaced or damaged): train it again with `pmlm policy train` "
            "(or `pmlm run`)"
        )
    return Policy(load_weights(zip_path), info)


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainedPolicy:
    policy: Policy
    log: TrainingLog
    path: Path


@dataclass(frozen=True)
class Episodes:
    """The training and validation encounters of one run, and how their answers are scored."""

    train: list[EditCase]
    validation: list[EditCase]
    reward: AnswerReward
    calibration: Calibration


def pick_episodes(index: pd.DataFrame, settings: PolicySettings) -> tuple[pd.DataFrame, ...]:
    """The training and the validation encounters (`pick_training_encounters`)."""
    train_rows, val_rows = (
        pick_training_encounters(
            index, split, n, settings.obstetric_share, settings.max_per_patient, settings.seed
        )
        for split, n in (("train", settings.n_train), ("validation", settings.n_validation))
    )
    if train_rows.empty or val_rows.empty:
        raise ValueError(
            "training a policy needs train and validation index encounters; this workspace has "
            f"{len(train_rows)} and {len(val_rows)}: ingest a larger cohort"
        )
    return train_rows, val_rows


def prepare_episodes(
    client: LLMClient,
    tables: Mapping[str, pd.DataFrame],
    signals_for: SignalsFor,
    settings: PolicySettings,
    say: Progress,
    calibration: Calibration | None = None,
) -> Episodes:
    """Build the cases and answer their initial prompts, scored with ``calibration``'s threshold
    (calibrated here on ``settings.n_calibration`` validation encounters when there is none)."""
    train_rows, val_rows = pick_episodes(tables["index_encounters"], settings)
    if calibration is None:
        _, calibration = calibrated_scorer(
            client, tables, settings.n_calibration, params=settings.params, progress=say
        )
    scorer = calibration.scorer()
    say(
        f"threshold {scorer.threshold}; signals and features of {len(train_rows)} training and "
        f"{len(val_rows)} validation encounters"
    )
    rows = pd.concat([train_rows, val_rows])
    refs = references(tables, rows)
    store = ContextStore(dict(tables), only_encounters=list(rows["encounter_id"]))
    train_cases = build_cases(tables, train_rows, signals_for, refs, store)
    val_cases = build_cases(tables, val_rows, signals_for, refs, store)
    reward = AnswerReward(client, scorer, settings.params)
    say(f"answers to the initial prompts of {len(train_cases) + len(val_cases)} encounters")
    reward.answer_many(
        [(c, INITIAL_CONFIG) for c in [*train_cases, *val_cases]],
        progress=progress_lines(say, "initial answers"),
    )
    return Episodes(train_cases, val_cases, reward, calibration)


def choose_start(episodes: Episodes, say: Progress) -> StartConfig:
    """The fixed config (`CONFIG_METHODS`) with the best mean reward on the VALIDATION
    encounters (ties: the earlier in `CONFIG_METHODS`). It costs at most two LLM calls per
    validation encounter (the initial prompts' answers are in memory already)."""
    reward, cases = episodes.reward, episodes.validation
    configs = {m: fixed_config(m) for m in CONFIG_METHODS}
    answered = reward.answer_many(
        [(c, cfg) for cfg in configs.values() for c in cases],
        progress=progress_lines(say, "answers of the fixed prompts on validation"),
    )
    means = {
        m: float(np.mean([a.score.reward for a in answered[i * len(cases) : (i + 1) * len(cases)]]))
        for i, m in enumerate(configs)
    }
    best = max(means, key=lambda m: (means[m], -CONFIG_METHODS.index(m)))
    say(
        "mean validation reward of the fixed prompts: "
        + ", ".join(f"{m} {v:+.4f}" for m, v in means.items())
        + f"; episodes start from {best}"
    )
    return StartConfig(best, configs[best], means)


def make_model(env: PromptEditEnv, settings: PolicySettings) -> Any:
    """MaskablePPO with ``settings``, logging nowhere."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.logger import Logger

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
    return model


def make_training(
    episodes: Episodes, start: StartConfig, settings: PolicySettings
) -> tuple[Any, PromptEditEnv]:
    """The PPO model on the training encounters (LLM rewards) and the validation environment,
    both starting from ``start``."""
    env = PromptEditEnv(
        episodes.train,
        episodes.reward,
        max_edits=settings.max_edits,
        edits=settings.edits,
        initial=start.config,
    )
    eval_env = PromptEditEnv(
        episodes.validation,
        episodes.reward,
        max_edits=settings.max_edits,
        edits=settings.edits,
        initial=start.config,
        sequential=True,
    )
    return make_model(env, settings), eval_env


def learn(
    model: Any,
    episodes: Episodes,
    eval_env: PromptEditEnv,
    settings: PolicySettings,
    say: Progress,
    tick: Tick | None,
) -> TrainingLog:
    """PPO until ``settings.timesteps`` or the LLM budget, validating every ``eval_freq`` steps;
    a last validation when the last one was earlier."""
    from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.monitor import Monitor

    from promptenv.policy_callbacks import KeepBestOnValidation, TrainingLog, TrainingMonitor

    log, reward = TrainingLog(), episodes.reward
    evaluation = MaskableEvalCallback(
        Monitor(eval_env),
        n_eval_episodes=len(episodes.validation),
        eval_freq=settings.eval_freq,
        deterministic=True,
        callback_after_eval=KeepBestOnValidation(reward, log, say),
        verbose=0,
    )
    monitor = TrainingMonitor(reward, log, settings.timesteps, settings.max_llm_calls, say, tick)
    model.learn(total_timesteps=settings.timesteps, callback=CallbackList([monitor, evaluation]))
    if not log.validation or log.validation[-1].timesteps < log.timesteps:
        point = validate_policy(model, eval_env, reward, log.timesteps)
        say(
            f"final validation: reward over the start prompt {point.validation_reward:+.4f} "
            f"({reward.llm_calls} LLM calls)"
        )
        log.record(point, None)
    return log


@dataclass(frozen=True)
class KeptCheckpoint:
    """The validation point of the weights kept, whether the policy falls back to its start
    config, the kept gain's interval over validation patients (None: not computed) and, with
    an out-of-fold check, the mean out-of-fold gain, its size and the pooled interval."""

    point: ValidationPoint
    falls_back: bool
    interval: tuple[float, float] | None = None
    out_of_fold: tuple[float, int, int] | None = None
    pooled: tuple[float, float] | None = None


#: Resamples of the kept gain's interval (`keep_checkpoint`).
INTERVAL_RESAMPLES = 2000


def keep_checkpoint(
    model: Any,
    log: TrainingLog,
    settings: PolicySettings,
    eval_env: PromptEditEnv,
    reward: AnswerReward,
    say: Progress,
) -> KeptCheckpoint:
    """Load the best validation checkpoint (``keep_best``) into ``model``, and decide whether
    the policy falls back to its start config.

    It falls back when no checkpoint beat the start config on the validation mean, and
    (``require_interval``) when the kept checkpoint's gain is not beyond the 95% interval
    bootstrapped over patients: the checkpoint was chosen as the best of several on the
    validation encounters, so a small mean gain on a few of them is mostly that choice's
    luck. The validation gains come from answers the validation already received (no new LLM
    call when the policy is deterministic). With an out-of-fold check (``log.held_out``,
    `promptenv.reward_model.out_of_fold_gains`), the gains of training patients that their
    fold's policy never saw join them: a validation split of a few dozen patients leaves an
    interval too wide for any gain a prompt edit can make (BENCHMARKS.md, "How much an edit
    of the peer prompt can gain"), and the held-out training patients, several times as
    many, were not used to choose the checkpoint."""
    from promptenv.paired import cluster_bootstrap_ci

    last = log.validation[-1]
    if settings.keep_best and log.best_weights is not None and log.best is not None:
        # the policy kept is the one that did best on validation patients (early stopping)
        model.policy.load_state_dict(log.best_weights)
        say(
            f"keeping the policy of step {log.best.timesteps:.0f} (validation reward over "
            f"the start prompt {log.best.validation_reward:+.4f}; last {last.validation_reward:+.4f})"
        )
    kept = log.best if settings.keep_best and log.best is not None else last
    out_of_fold = None
    if log.held_out is not None:
        held = log.held_out
        out_of_fold = (float(np.mean(held.gains)), len(held.gains), len(set(held.patients)))
    if settings.keep_best and kept.validation_reward <= 0:
        shown = (
            ""
            if out_of_fold is None
            else f"; out of fold {out_of_fold[0]:+.4f} on {out_of_fold[1]} training encounters"
        )
        say(
            f"no checkpoint beat the start prompt on validation (best "
            f"{kept.validation_reward:+.4f}{shown}): the policy keeps the start prompt (no edit)"
        )
        return KeptCheckpoint(kept, True, out_of_fold=out_of_fold)
    if not (settings.keep_best and settings.require_interval):
        return KeptCheckpoint(kept, False)
    gains, patients = validation_gains(model, eval_env, reward)
    low, high = cluster_bootstrap_ci(gains, patients, INTERVAL_RESAMPLES, settings.seed)
    shown = (
        f"{float(gains.mean()):+.4f} [{low:+.4f}, {high:+.4f}] over "
        f"{len(set(patients))} validation patients"
    )
    pooled, decided = None, low
    if log.held_out is not None and out_of_fold is not None:
        pooled = cluster_bootstrap_ci(
            np.concatenate([gains, log.held_out.gains]),
            np.concatenate([patients, log.held_out.patients]),
            INTERVAL_RESAMPLES,
            settings.seed,
        )
        decided = pooled[0]
        shown += (
            f"; out of fold {out_of_fold[0]:+.4f} on {out_of_fold[1]} encounters of "
            f"{out_of_fold[2]} training patients; both: [{pooled[0]:+.4f}, {pooled[1]:+.4f}]"
        )
    if not decided > 0:  # NaN (fewer than 2 patients) falls back too
        say(
            f"the policy's gain over the start prompt, {shown}, is not beyond its interval: "
            "the policy keeps the start prompt (no edit)"
        )
        return KeptCheckpoint(kept, True, (low, high), out_of_fold, pooled)
    say(f"the policy's gain over the start prompt: {shown}")
    return KeptCheckpoint(kept, False, (low, high), out_of_fold, pooled)


def summarize(
    log: TrainingLog,
    reward: AnswerReward,
    checkpoint: KeptCheckpoint,
    seconds: float,
) -> TrainingSummary:
    """What training did and cost (`TrainingSummary`)."""
    stats, kept = reward.client.cache_stats, checkpoint.point
    low, high = checkpoint.interval or (None, None)
    pooled_low, pooled_high = checkpoint.pooled or (None, None)
    oof_gain, oof_encounters, oof_patients = checkpoint.out_of_fold or (None, 0, 0)
    return TrainingSummary(
        timesteps=log.timesteps,
        episodes=log.episodes,
        llm_calls=reward.llm_calls,
        answers=reward.answers,
        client_cache_hits=stats.hits,
        client_cache_misses=stats.misses,
        cache_hit_rate=1 - reward.llm_calls / max(1, reward.answers),
        stopped_by_budget=log.stopped_by_budget,
        validation_curve=tuple(log.validation),
        final_validation_reward=log.validation[-1].validation_reward,
        kept_timesteps=kept.timesteps,
        kept_validation_reward=kept.validation_reward,
        falls_back_to_start=checkpoint.falls_back,
        kept_validation_low=None if low is None or np.isnan(low) else float(low),
        kept_validation_high=None if high is None or np.isnan(high) else float(high),
        out_of_fold_gain=oof_gain,
        out_of_fold_encounters=oof_encounters,
        out_of_fold_patients=oof_patients,
        pooled_low=None if pooled_low is None or np.isnan(pooled_low) else float(pooled_low),
        pooled_high=None if pooled_high is None or np.isnan(pooled_high) else float(pooled_high),
        llm_calls_to_kept_validation_reward=kept.llm_calls,
        llm_calls_to_final_validation_reward=calls_to_final(log.validation),
        seconds=round(seconds, 1),
    )


def train_policy(
    client: LLMClient,
    tables: Mapping[str, pd.DataFrame],
    signals_for: SignalsFor,
    folder: Path,
    settings: PolicySettings | None = None,
    versions: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    tick: Tick | None = None,
    calibration: Calibration | None = None,
) -> TrainedPolicy:
    """Train MaskablePPO on training encounters, validate on validation encounters, save to ``folder``.

    ``versions`` (data fingerprint, recommender, ...) is stored with the policy;
    ``calibration`` is the matching threshold (a workspace's,
    `promptenv.calibration.workspace_calibration`; calibrated here when None).
    """
    settings = settings or PolicySettings()
    say = progress or (lambda _m: None)
    started = time.perf_counter()
    episodes = prepare_episodes(client, tables, signals_for, settings, say, calibration)
    start = choose_start(episodes, say)
    model, eval_env = make_training(episodes, start, settings)
    if settings.reward_model:
        from promptenv.reward_model import learn_with_reward_model

        log = learn_with_reward_model(
            model, episodes.train, eval_env, episodes.reward, start, settings, say, tick
        )
    else:
        log = learn(model, episodes, eval_env, settings, say, tick)
    checkpoint = keep_checkpoint(model, log, settings, eval_env, episodes.reward, say)
    info = PolicyInfo(
        settings=settings,
        trained_with=TrainedWith(
            llm=client.label,
            threshold=episodes.reward.scorer.threshold,
            calibration=episodes.calibration.to_json(),
            train_encounters=len(episodes.train),
            validation_encounters=len(episodes.validation),
            versions=dict(versions or {}),
        ),
        training=summarize(log, episodes.reward, checkpoint, time.perf_counter() - started),
        start=start,
    )
    policy = save_policy(model, info, folder)
    say(f"policy {policy.version} saved to {folder}")
    return TrainedPolicy(policy, log, folder)


__all__ = [
    "INFO_FILE",
    "INTERVAL_RESAMPLES",
    "POLICY_FILE",
    "KeptCheckpoint",
    "Policy",
    "PolicyInfo",
    "PolicySettings",
    "StartConfig",
    "TrainedPolicy",
    "TrainedWith",
    "TrainingSummary",
    "ValidationPoint",
    "calls_to_final",
    "choose_start",
    "load_policy",
    "load_weights",
    "pick_training_encounters",
    "policy_dir",
    "policy_in_training",
    "read_policy_info",
    "save_policy",
    "train_policy",
    "validate_policy",
    "validation_gains",
]
