"""What a prompt-table build is made of: its spec, its plan and batches, what it wrote.

Small frozen values that the Prefect tasks pass around (ids, counts, paths);
the recommender states stay in the plan's ``run_dir``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.index import CONTEXT_TABLES
from pipelines.schemas import PATIENT_TABLES
from pipelines.workspace import Workspace
from promptenv.fragments import PatientSignals
from promptenv.prompt_table.build import Which
from promptenv.prompts import INITIAL_CONFIG, PromptConfig
from recsys.signals import SignalSettings

REFRESH_DIR = "refresh"
STATE_VERSION = 2

#: Tables a batch reads for the prompts' patient contexts.
BATCH_TABLES = ("patients", "index_encounters", "plan_items", *CONTEXT_TABLES)
#: Tables the plan reads: fingerprints, states, encounters.
PLAN_TABLES = PATIENT_TABLES
_MATRICES = ("features", "history", "last_plan", "targets")


@dataclass(frozen=True)
class PromptTableSpec:
    """What the prompt table holds and how it is built.

    ``batch_size`` (patients per batch) changes how the work is split, never the table.
    """

    methods: tuple[str, ...] = ("pmlm_initial",)
    which: Which = "latest"
    settings: SignalSettings = field(default_factory=SignalSettings)
    config: PromptConfig = INITIAL_CONFIG
    batch_size: int = 32
    #: version of the workspace's trained policy, required with the method ``pmlm``
    policy_version: str = ""

    def __post_init__(self) -> None:
        if "pmlm" in self.methods and not self.policy_version:
            raise ValueError(
                "the method pmlm needs the trained policy's version (`pmlm policy train`)"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.methods:
            raise ValueError("the prompt table needs at least one method")
        if self.which not in ("latest", "test", "all"):
            raise ValueError(f"which must be latest, test or all, not {self.which!r}")

    def identity(self) -> dict[str, Any]:
        """Everything that decides the table's content (JSON)."""
        return {
            "version": STATE_VERSION,
            "methods": list(self.methods),
            "which": self.which,
            "settings": asdict(self.settings),
            "config": self.config.as_dict(),
            "policy": self.policy_version,
        }


@dataclass(frozen=True)
class PromptBatch:
    """Index encounters of a few patients, computed together; ``key`` hashes every input."""

    index: int
    key: str
    encounter_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]


@dataclass(frozen=True)
class PromptPlan:
    """What `plan_prompt_table` decided; small (ids and counts), the states stay in ``run_dir``.

    ``reasons`` counts the patients recomputed for each reason (each patient once, in
    this order): ``all`` (full recompute), ``records``, ``states``, ``peers``;
    ``removed`` counts the patients whose rows are dropped.
    """

    workspace: Path
    run_dir: Path
    spec: PromptTableSpec
    model: str
    model_fingerprint: str
    batches: tuple[PromptBatch, ...]
    patients: int
    reasons: Mapping[str, int]
    removed: tuple[str, ...]
    full_reason: str | None
    record_changes: Mapping[str, int] | None

    @property
    def recomputed_patients(self) -> int:
        return sum(len(b.patient_ids) for b in self.batches)

    def describe(self) -> str:
        """One line for a log."""
        if self.full_reason:
            why = f"full recompute ({self.full_reason})"
        else:
            parts = [f"{n} {r}" for r, n in self.reasons.items() if n]
            why = "changed: " + (", ".join(parts) if parts else "nothing")
            if self.removed:
                why += f"; {len(self.removed)} patients removed"
        if self.record_changes is not None:
            c = self.record_changes
            why += (
                f"; records of {c['added']} patients added, {c['modified']} modified, "
                f"{c['removed']} removed"
            )
        return (
            f"prompts for {self.recomputed_patients} of {self.patients} patients "
            f"in {len(self.batches)} batches ({why}); recommender {self.model}"
        )


@dataclass(frozen=True)
class BatchSignals:
    """The signals of one batch's encounters and their peers (for the next refresh)."""

    signals: Mapping[str, PatientSignals]
    queries: pd.DataFrame  # QUERY_COLUMNS


@dataclass(frozen=True)
class RefreshResult:
    """What `write_refreshed_table` wrote."""

    path: Path
    recommender: str
    rows: int
    patients: int
    recomputed_patients: int
    reasons: Mapping[str, int]
    removed: int
    full_reason: str | None
    batches: int

    @property
    def share_recomputed(self) -> float:
        return self.recomputed_patients / self.patients if self.patients else 0.0

    def describe(self) -> str:
        """One line for a log."""
        return (
            f"{self.rows} prompts for {self.patients} patients → {self.path} "
            f"({self.recomputed_patients} recomputed)"
        )


QUERY_COLUMNS = ("encounter_id", "patient_id", "peer_encounter_ids", "kth_similarity", "n_peers")
STATE_COLUMNS = ("encounter_id", "patient_id", "split", "index_us", "next_us", "state_hash")


def refresh_dir(workspace: Workspace) -> Path:
    return workspace.cache_dir / REFRESH_DIR


def digest(payload: Any) -> str:
    """A short, stable hash of a JSON-able ``payload`` (batch and plan keys)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
