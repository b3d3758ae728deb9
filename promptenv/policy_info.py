"""What a saved policy carries (``models/policy/policy.json``), as typed records.

`PolicyInfo` holds the training settings (`PolicySettings`), the edit space it
was trained on, what it was trained with (`TrainedWith`: data and recommender
versions, the LLM, the matching threshold) and what training cost
(`TrainingSummary`: episodes, LLM calls, the validation curve, the kept
checkpoint) and where its episodes start (`StartConfig`). Each record turns into the JSON of ``policy.json`` with
``to_json`` and back with ``from_json``; keys a record does not know are
ignored and missing ones take their defaults, so older files still load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from pipelines.workspace import Workspace
from promptenv.editing import EDIT_SPACE_VERSION, EDITS, K_LADDER, edit_ids
from promptenv.encounters import CALIBRATION_ENCOUNTERS, EVAL_PARAMS
from promptenv.llm import GenerationParams
from promptenv.prompts import INITIAL_CONFIG, PromptConfig
from promptenv.reward import DEFAULT_THRESHOLD

POLICY_FILE = "policy.zip"
INFO_FILE = "policy.json"


def policy_dir(workspace: Workspace) -> Path:
    """Where a workspace's policy is saved: ``models/policy``."""
    return workspace.models_dir / "policy"


def policy_info_path(folder: Path) -> Path:
    """The ``policy.json`` of the policy saved in ``folder`` (see `policy_dir`)."""
    return folder / INFO_FILE


def saved_policy_version(workspace: Workspace) -> str | None:
    """The version of the workspace's saved policy; None while no policy is trained."""
    path = policy_info_path(policy_dir(workspace))
    if not path.exists():
        return None
    try:
        version = json.loads(path.read_text()).get("version")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(
            f"{path} is not a JSON object ({exc}): retrain the policy with `pmlm policy train`"
        ) from exc
    return None if version is None else str(version)


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of the dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def params_from_json(data: Mapping[str, Any]) -> GenerationParams:
    known = _known(GenerationParams, data)
    if "stop" in known:
        known["stop"] = tuple(known["stop"])
    return GenerationParams(**known)


class ModelTarget(StrEnum):
    """What the reward model can learn (`PolicySettings.model_target`)."""

    gain = "gain"
    reward = "reward"


MODEL_TARGETS = tuple(t.value for t in ModelTarget)


@dataclass(frozen=True)
class PolicySettings:
    """What the policy trains on, for how long, with which PPO settings and LLM budget."""

    n_train: int = 96
    obstetric_share: float = 0.5
    n_validation: int = 16
    max_per_patient: int = 2
    max_edits: int = 6
    #: the edits the policy may make, by label (``("add self",)``); empty: every edit
    edits: tuple[str, ...] = ()
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
    #: with ``keep_best``: keep the trained edits only when their validation gain over the start
    #: config is beyond the 95% interval bootstrapped over validation patients (else fall back)
    require_interval: bool = True
    #: train against a learned reward model (`promptenv.reward_model`): ``model_rounds``
    #: rounds of ``model_timesteps`` PPO steps each, LLM calls only between rounds
    reward_model: bool = False
    model_rounds: int = 4
    model_timesteps: int = 2048
    #: what the reward model learns: ``"gain"``, a config's reward minus the start config's on
    #: the same encounter, or ``"reward"``, the reward itself (before 2026-12-05)
    model_target: str = "gain"
    #: trees' sds taken off a reward the model predicts, in PPO (`promptenv.reward_model.ModelReward`)
    model_pessimism: float = 0.0
    #: PPO sees the model's prediction for every pair but the start config's, the LLM's
    #: scores only through the fit (`promptenv.reward_model.ModelReward`)
    model_smooth: bool = False
    #: with ``reward_model`` and ``require_interval``: the fall-back is decided on validation
    #: patients and on training patients held out of ``folds`` PPO runs (0 or 1: validation only)
    folds: int = 5
    n_calibration: int = CALIBRATION_ENCOUNTERS
    seed: int = 0
    params: GenerationParams = field(default_factory=lambda: EVAL_PARAMS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits", tuple(self.edits))  # a JSON list reads back as one
        edit_ids(self.edits)  # an unknown label is a one-line error here, before anything loads
        if self.model_target not in MODEL_TARGETS:
            raise ValueError(
                f"model_target {self.model_target!r} is not one of {', '.join(MODEL_TARGETS)}"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PolicySettings:
        known = _known(cls, data)
        if "params" in known:
            known["params"] = params_from_json(known["params"])
        return cls(**known)


@dataclass(frozen=True)
class ValidationPoint:
    """One validation of the deterministic policy during training."""

    timesteps: float
    llm_calls: float
    validation_reward: float

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ValidationPoint:
        return cls(**{k: float(v) for k, v in _known(cls, data).items()})


@dataclass(frozen=True)
class TrainedWith:
    """The data, recommender and LLM a policy was trained with, and the matching threshold.

    ``versions`` are the caller's (data hash, recommender, ...); in ``policy.json``
    they sit beside the other keys of ``trained_with``.
    """

    llm: str = ""
    threshold: float = DEFAULT_THRESHOLD
    calibration: Mapping[str, Any] = field(default_factory=dict)
    train_encounters: int = 0
    validation_encounters: int = 0
    versions: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **dict(self.versions),
            "llm": self.llm,
            "threshold": self.threshold,
            "calibration": dict(self.calibration),
            "train_encounters": self.train_encounters,
            "validation_encounters": self.validation_encounters,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainedWith:
        known = _known(cls, data)
        known.pop("versions", None)
        versions = {k: v for k, v in data.items() if k not in known and k != "versions"}
        return cls(**known, versions=versions)


@dataclass(frozen=True)
class TrainingSummary:
    """What training did and cost, and which checkpoint was kept."""

    timesteps: int = 0
    episodes: int = 0
    llm_calls: int = 0
    answers: int = 0
    client_cache_hits: int = 0
    client_cache_misses: int = 0
    #: answers served without a new LLM call (from memory or the client's cache)
    cache_hit_rate: float = 0.0
    stopped_by_budget: bool = False
    validation_curve: tuple[ValidationPoint, ...] = ()
    final_validation_reward: float = 0.0
    kept_timesteps: float = 0.0
    kept_validation_reward: float = 0.0
    #: no checkpoint beat the start config (`StartConfig`) on validation: the policy makes no
    #: edit ("falls_back_to_initial" in files written before the start was chosen)
    falls_back_to_start: bool = False
    #: the kept checkpoint's validation gain over the start config: 95% interval bootstrapped
    #: over validation patients (None: not computed, e.g. the policy fell back on its mean)
    kept_validation_low: float | None = None
    kept_validation_high: float | None = None
    #: the out-of-fold check (`PolicySettings.folds`): the mean gain over the start config of
    #: the training patients' encounters that their fold's policy never saw, how many, and the
    #: 95% interval of those pooled with the validation gains, on which the fall-back was decided
    out_of_fold_gain: float | None = None
    out_of_fold_encounters: int = 0
    out_of_fold_patients: int = 0
    pooled_low: float | None = None
    pooled_high: float | None = None
    llm_calls_to_kept_validation_reward: float = 0.0
    llm_calls_to_final_validation_reward: float = 0.0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["validation_curve"] = [p.to_json() for p in self.validation_curve]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainingSummary:
        known = _known(cls, data)
        if "falls_back_to_initial" in data and "falls_back_to_start" not in data:
            known["falls_back_to_start"] = bool(data["falls_back_to_initial"])
        curve: Sequence[Mapping[str, Any]] = known.pop("validation_curve", ())
        return cls(**known, validation_curve=tuple(ValidationPoint.from_json(p) for p in curve))


@dataclass(frozen=True)
class StartConfig:
    """The config every episode starts from, and a policy that beat nothing falls back to: the
    fixed method (`promptenv.prompts.CONFIG_METHODS`) with the best mean reward on the
    validation encounters (``validation_rewards``). Files written before it was chosen
    started from the initial config."""

    method: str = "pmlm_initial"
    config: PromptConfig = INITIAL_CONFIG
    validation_rewards: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "config": self.config.as_dict(),
            "validation_rewards": dict(self.validation_rewards),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StartConfig:
        return cls(
            method=str(data.get("method", "pmlm_initial")),
            config=PromptConfig.from_dict(data.get("config", {})),
            validation_rewards={k: float(v) for k, v in data.get("validation_rewards", {}).items()},
        )


@dataclass(frozen=True)
class PolicyInfo:
    """Everything ``policy.json`` records about a policy (see the module docstring)."""

    settings: PolicySettings = field(default_factory=PolicySettings)
    trained_with: TrainedWith = field(default_factory=TrainedWith)
    training: TrainingSummary = field(default_factory=TrainingSummary)
    start: StartConfig = field(default_factory=StartConfig)
    #: sha256 prefix of the saved weights, the start config and the fall-back flag; "" before saving
    version: str = ""
    edit_space_version: int = EDIT_SPACE_VERSION
    edits: tuple[str, ...] = tuple(e.label for e in EDITS)
    k_ladder: tuple[int, ...] = K_LADDER
    initial_config: PromptConfig = INITIAL_CONFIG

    @property
    def same_edit_space(self) -> bool:
        """Whether the policy was trained on this code's edits, masks and k ladder."""
        return (
            self.edit_space_version == EDIT_SPACE_VERSION
            and self.edits == tuple(e.label for e in EDITS)
            and self.k_ladder == K_LADDER
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_json(),
            "edit_space_version": self.edit_space_version,
            "edits": list(self.edits),
            "k_ladder": list(self.k_ladder),
            "initial_config": self.initial_config.as_dict(),
            "trained_with": self.trained_with.to_json(),
            "training": self.training.to_json(),
            "start": self.start.to_json(),
            "version": self.version,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PolicyInfo:
        return cls(
            settings=PolicySettings.from_json(data.get("settings", {})),
            trained_with=TrainedWith.from_json(data.get("trained_with", {})),
            training=TrainingSummary.from_json(data.get("training", {})),
            start=StartConfig.from_json(data.get("start", {})),
            version=str(data.get("version", "")),
            edit_space_version=int(data.get("edit_space_version", -1)),
            edits=tuple(data.get("edits", ())),
            k_ladder=tuple(data.get("k_ladder", ())),
            initial_config=PromptConfig.from_dict(data.get("initial_config", {})),
        )


__all__ = [
    "INFO_FILE",
    "POLICY_FILE",
    "PolicyInfo",
    "PolicySettings",
    "StartConfig",
    "TrainedWith",
    "TrainingSummary",
    "ValidationPoint",
    "policy_dir",
    "policy_info_path",
    "saved_policy_version",
]
