"""The prompt table, kept up to date incrementally: recompute only the patients whose inputs changed.

A build has three steps, so that a scheduler can fan the middle one out:

1. `plan_prompt_table` reads the canonical tables, computes every patient's
   record fingerprint (`pipelines.fingerprint`) and the selected recommender's
   state and embedding of every index encounter (one vectorized pass), compares
   them with what the current prompt table was built from, and splits the
   patients to recompute into batches;
2. per batch, `batch_signals` (self and peer signals) and `batch_prompts` (the
   prompt rows); a batch reads the plan's files, never another batch's;
3. `write_refreshed_table` keeps the rows of the other patients, adds the new
   ones, writes ``tables/prompts.parquet`` and then the state that the next
   refresh compares with.

A patient is recomputed when her records changed (added, edited or removed
rows), when her recommender state changed (a state also depends on the plan
items of the whole cohort, through the codes that count as plan items), or when
her peers may have changed: the state through which one of her peers was found
changed, or a changed training state eligible as her peer is at least as similar
as her k-th peer (any other change leaves her k most similar patients, their
states and what they received next as they were). Everyone is recomputed when
there is no previous build, when the recommender or the prompt settings
changed, or when the prompt table was replaced since (e.g. by ``pmlm prompts
build``). The result equals a full recompute: self signals are scored one
state at a time and peers searched one query at a time, so a row never depends
on which other rows share its batch.

The recommender is never refit here: a refresh uses the workspace's selected
model (`pmlm recsys fit` or the build flow fits it).

Files under ``WORKSPACE/cache/refresh/`` (deleting them forces a full recompute)::

    build.json         spec, recommender fingerprint and prompt-file sha256 of the current table
    patients.parquet   patient_id, fingerprint: the records the table was built from
    states.parquet     every index encounter's state hash (encounter_id, patient_id, split,
                       index_us, next_us, state_hash)
    queries.parquet    per prompt-table encounter: its peers' states (encounter ids), the
                       k-th peer's similarity and the number of peers found
    run-KEY/           one build's recommender states and embeddings, read by the batches
                       and deleted once the table is written (one build at a time per
                       workspace)

Usage::

    result = refresh_prompt_table(Workspace.at("pmlm-workspace"))
    result.recomputed_patients, result.patients, result.full_reason
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.sparse as sp

from pipelines.export import file_sha256
from pipelines.fingerprint import (
    ChangedPatients,
    combine_by_key,
    compare_fingerprints,
    files_fingerprint,
    matrix_row_hashes,
    patient_fingerprints,
    row_hashes,
)
from pipelines.index import CONTEXT_TABLES
from pipelines.ingest import load_tables
from pipelines.schemas import PATIENT_TABLES
from pipelines.workspace import Workspace, atomic_write_bytes
from promptenv.fragments import PatientSignals, patient_signals_by_encounter
from promptenv.policy import load_policy, policy_dir
from promptenv.prompt_table import (
    PROMPT_TABLE,
    PROMPTS_SCHEMA,
    Which,
    build_prompt_table,
    choose_encounters,
    write_prompt_table,
)
from promptenv.prompts import INITIAL_CONFIG, PromptConfig
from promptenv.signals import SignalSettings, selected_model_name
from recsys.base import Recommender, load_recommender
from recsys.interactions import STATE_KEY_COLUMNS, CohortTables, PatientStates, build_states
from recsys.signals import peer_signals, self_signals, unit_rows
from recsys.steps import models_dir

Progress = Callable[[str], None]

REFRESH_DIR = "refresh"
STATE_VERSION = 2
#: A changed training state this close below a query's k-th peer similarity still counts
#: as a possible peer (similarities are float32; the search compares them to 6 decimals).
SIMILARITY_MARGIN = 1e-5
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


QUERY_COLUMNS = ("encounter_id", "patient_id", "peer_encounter_ids", "kth_similarity", "n_peers")
STATE_COLUMNS = ("encounter_id", "patient_id", "split", "index_us", "next_us", "state_hash")


def refresh_dir(workspace: Workspace) -> Path:
    return workspace.cache_dir / REFRESH_DIR


# --------------------------------------------------------------------------- plan


def plan_prompt_table(
    workspace: Workspace,
    spec: PromptTableSpec | None = None,
    *,
    full: bool = False,
) -> PromptPlan:
    """Compare the workspace with its last prompt-table build and plan the batches to compute.

    ``full=True`` recomputes every patient. Raises FileNotFoundError when no
    recommender was fitted (run `pmlm recsys fit` or the build flow first).
    """
    spec = spec or PromptTableSpec()
    tables = load_tables(workspace, PLAN_TABLES)
    name = selected_model_name(workspace)
    model_fp = files_fingerprint(models_dir(workspace))
    model = _load_model(workspace, name)
    assert model.vocab is not None
    records = patient_fingerprints(tables)
    states = build_states(CohortTables.from_frames(tables), model.vocab)
    embeddings = model.embed(states)
    state_frame = _state_frame(states, embeddings)
    chosen = choose_encounters(tables["index_encounters"], spec.which)
    chosen = chosen.sort_values(["patient_id", "index_time", "encounter_id"])

    previous = _read_previous(workspace)
    full_reason = _full_reason(workspace, previous, spec, model_fp, full)
    patients_now = set(chosen["patient_id"])
    reasons: dict[str, int] = {"all": 0, "records": 0, "states": 0, "peers": 0}
    record_changes: dict[str, int] | None = None
    removed: tuple[str, ...] = ()
    if full_reason is not None or previous is None:
        todo = patients_now
        reasons["all"] = len(todo)
    else:
        changes = compare_fingerprints(previous.patients, records)
        record_changes = changes.as_dict()
        by_record, by_state, by_peers = _affected(
            changes, previous, state_frame, embeddings, chosen, spec.settings
        )
        todo = (by_record | by_state | by_peers) & patients_now
        reasons["records"] = len(by_record & patients_now)
        reasons["states"] = len((by_state - by_record) & patients_now)
        reasons["peers"] = len((by_peers - by_record - by_state) & patients_now)
        shown = set(previous.queries["patient_id"])
        removed = tuple(sorted(p for p in shown if p not in patients_now))

    batches = _batches(chosen, todo, records, state_frame, spec, model_fp)
    key = _digest(
        {
            "model": model_fp,
            "spec": spec.identity(),
            "batches": [b.key for b in batches],
            "removed": removed,
        }
    )
    run_dir = refresh_dir(workspace) / f"run-{key}"
    if batches:
        _save_states(run_dir, states, embeddings)
    _write_frame(run_dir / "records.parquet", records)
    _write_frame(run_dir / "states.parquet", state_frame)
    return PromptPlan(
        workspace=workspace.root,
        run_dir=run_dir,
        spec=spec,
        model=name,
        model_fingerprint=model_fp,
        batches=tuple(batches),
        patients=len(patients_now),
        reasons=reasons,
        removed=removed,
        full_reason=full_reason,
        record_changes=record_changes,
    )


@dataclass(frozen=True)
class _Previous:
    build: dict[str, Any]
    patients: pd.DataFrame
    states: pd.DataFrame
    queries: pd.DataFrame


def _read_previous(workspace: Workspace) -> _Previous | None:
    folder = refresh_dir(workspace)
    files = [folder / n for n in ("build.json", "patients.parquet", "states.parquet")]
    files.append(folder / "queries.parquet")
    if not all(f.exists() for f in files):
        return None
    return _Previous(
        build=json.loads(files[0].read_text()),
        patients=pd.read_parquet(files[1]),
        states=pd.read_parquet(files[2]),
        queries=pd.read_parquet(files[3]),
    )


def _full_reason(
    workspace: Workspace,
    previous: _Previous | None,
    spec: PromptTableSpec,
    model_fp: str,
    full: bool,
) -> str | None:
    if full:
        return "asked"
    if previous is None:
        return "no previous build in this workspace"
    if previous.build.get("spec") != spec.identity():
        return "the prompt settings changed"
    if previous.build.get("model_fingerprint") != model_fp:
        return "the recommender changed"
    path = workspace.table_path(PROMPT_TABLE)
    if not path.exists():
        return f"{path} is missing"
    if file_sha256(path) != previous.build.get("table_sha256"):
        return f"{path} was replaced since the last build"
    return None


def _affected(
    changes: ChangedPatients,
    previous: _Previous,
    states: pd.DataFrame,
    embeddings: np.ndarray,
    chosen: pd.DataFrame,
    settings: SignalSettings,
) -> tuple[set[str], set[str], set[str]]:
    """Patients to recompute because of their records, their states, their peers."""
    by_record = set(changes.changed)
    old = previous.states.set_index("encounter_id")
    new = states.assign(row=np.arange(len(states))).set_index("encounter_id")
    common = new.index.intersection(old.index)
    same = pd.Series(False, index=new.index)
    same[common] = new.loc[common, "state_hash"].to_numpy() == old.loc[common, "state_hash"]
    new_changed = new[~same.to_numpy()]
    old_changed = old[~old.index.isin(new.index[same.to_numpy()])]
    by_state = set(new_changed["patient_id"]) | set(old_changed["patient_id"])

    # the other patients' prompt-table encounters, with the peers stored for them
    stored = previous.queries.set_index("encounter_id")
    mine = chosen[~chosen["patient_id"].isin(by_record | by_state)]
    missing = mine[~mine["encounter_id"].isin(stored.index)]
    by_peers = set(missing["patient_id"])
    mine = mine[mine["encounter_id"].isin(stored.index)]
    if mine.empty:
        return by_record, by_state, by_peers
    q = new.loc[mine["encounter_id"]]
    q_patient = q["patient_id"].to_numpy()
    q_index = q["index_us"].to_numpy()
    info = stored.loc[mine["encounter_id"]]
    affected = np.zeros(len(q), dtype=bool)

    # the state through which a peer of hers was found changed or is gone
    gone = set(old_changed.index[old_changed["split"] == "train"])
    if gone:
        peer_states = info["peer_encounter_ids"].to_numpy()
        affected |= np.array([not gone.isdisjoint(ids) for ids in peer_states], dtype=bool)

    # a changed or new training state, eligible for her, as similar as her k-th peer: it may
    # enter her peers, or raise the similarity of one (her other peers' states are unchanged,
    # so nothing else can move)
    came = new_changed[new_changed["split"] == "train"]
    if len(came):
        sims = (
            unit_rows(embeddings[q["row"].to_numpy()])
            @ unit_rows(embeddings[came["row"].to_numpy()]).T
        )
        eligible = (came["next_us"].to_numpy()[None, :] <= q_index[:, None]) & (
            came["patient_id"].to_numpy()[None, :] != q_patient[:, None]
        )
        short = info["n_peers"].to_numpy() < settings.n_peers
        kth = info["kth_similarity"].fillna(-np.inf).to_numpy(dtype=np.float64)
        close = sims >= (kth - SIMILARITY_MARGIN)[:, None]
        affected |= (eligible & (close | short[:, None])).any(axis=1)

    by_peers |= set(q_patient[affected])
    return by_record, by_state, by_peers


def _batches(
    chosen: pd.DataFrame,
    todo: set[str],
    records: pd.DataFrame,
    states: pd.DataFrame,
    spec: PromptTableSpec,
    model_fp: str,
) -> list[PromptBatch]:
    work = chosen[chosen["patient_id"].isin(todo)]
    if work.empty:
        return []
    record_of = dict(zip(records["patient_id"], records["fingerprint"], strict=True))
    state_of = combine_by_key(states["patient_id"], states["state_hash"].to_numpy())["hash"]
    pool = states[states["split"] == "train"].sort_values("encounter_id")
    pool_fp = _digest(list(zip(pool["encounter_id"], pool["state_hash"].astype(str), strict=True)))
    base = {"model": model_fp, "spec": spec.identity(), "pool": pool_fp}
    patients = sorted(set(work["patient_id"]))
    encounters = work.groupby("patient_id", sort=True)["encounter_id"].apply(list)
    batches = []
    for i, start in enumerate(range(0, len(patients), spec.batch_size)):
        group = patients[start : start + spec.batch_size]
        ids = tuple(e for p in group for e in encounters[p])
        inputs = [(p, record_of[p], str(state_of.get(p, 0)), encounters[p]) for p in group]
        batches.append(PromptBatch(i, _digest({**base, "patients": inputs}), ids, tuple(group)))
    return batches


def _state_frame(states: PatientStates, embeddings: np.ndarray) -> pd.DataFrame:
    """One row per state: keys and a hash of everything the signals read of it."""
    assert states.targets is not None
    parts = pd.DataFrame(
        {
            "keys": row_hashes(states.keys[list(STATE_KEY_COLUMNS)]),
            "features": matrix_row_hashes(states.features),
            "history": matrix_row_hashes(states.history),
            "last_plan": matrix_row_hashes(states.last_plan),
            "targets": matrix_row_hashes(states.targets),
            "embedding": matrix_row_hashes(embeddings),
        }
    )
    keys = states.keys
    return pd.DataFrame(
        {
            "encounter_id": keys["encounter_id"].astype(str).to_numpy(),
            "patient_id": keys["patient_id"].astype(str).to_numpy(),
            "split": keys["split"].astype(str).to_numpy(),
            "index_us": keys["index_us"].to_numpy(dtype=np.int64),
            "next_us": keys["next_us"].to_numpy(dtype=np.int64),
            "state_hash": pd.util.hash_pandas_object(parts, index=False).to_numpy(np.uint64),
        }
    )


def _save_states(run_dir: Path, states: PatientStates, embeddings: np.ndarray) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_frame(run_dir / "keys.parquet", states.keys)
    for name in _MATRICES:
        matrix = getattr(states, name)
        path = run_dir / f"{name}.npz"
        sp.save_npz(path, sp.csr_matrix(matrix), compressed=False)
    np.save(run_dir / "n_true.npy", np.asarray(states.n_true))
    np.save(run_dir / "embeddings.npy", np.asarray(embeddings, dtype=np.float32))


def _load_states(run_dir: Path, model: Recommender) -> tuple[PatientStates, np.ndarray]:
    if not (run_dir / "embeddings.npy").exists():
        raise FileNotFoundError(
            f"{run_dir} holds no recommender states: plan the prompt table again "
            "(its run folder is deleted once the table is written)"
        )
    assert model.vocab is not None
    matrices = {name: sp.load_npz(run_dir / f"{name}.npz").tocsr() for name in _MATRICES}
    states = PatientStates(
        keys=pd.read_parquet(run_dir / "keys.parquet"),
        features=matrices["features"],
        history=matrices["history"],
        last_plan=matrices["last_plan"],
        targets=matrices["targets"],
        n_true=np.load(run_dir / "n_true.npy"),
        vocab=model.vocab,
    )
    return states, np.load(run_dir / "embeddings.npy")


# --------------------------------------------------------------------------- batches


def batch_signals(plan: PromptPlan, batch: PromptBatch) -> BatchSignals:
    """Self and peer signals of a batch's encounters (peers from TRAIN states only)."""
    ws = Workspace.at(plan.workspace)
    _check_model(ws, plan)
    model = _load_model(ws, plan.model)
    states, embeddings = _load_states(plan.run_dir, model)
    settings = plan.spec.settings
    position = pd.Index(states.keys["encounter_id"].astype(str))
    rows = position.get_indexer(list(batch.encounter_ids))
    if (rows < 0).any():
        raise KeyError(f"batch {batch.index} names encounters that the plan's states lack")
    queries = states.subset(rows)
    pool = np.flatnonzero((states.keys["split"] == "train").to_numpy())
    # one state (one query) at a time: a row's floats never depend on its batch
    own = self_signals(
        model, queries, k=settings.k_self, n_reasons=settings.n_reasons, chunk_size=1
    )
    peers = peer_signals(
        model,
        queries,
        states.subset(pool),
        k=settings.n_peers,
        min_support=settings.min_support,
        max_statements=settings.max_statements,
        chunk_size=1,
        query_embeddings=embeddings[rows],
        pool_embeddings=embeddings[pool],
    )
    found = patient_signals_by_encounter(
        own.items,
        own.reasons,
        peers.statements,
        peers.peers,
        model=plan.model,
        min_support=settings.min_support,
    )
    empty = PatientSignals(model=plan.model, min_support=settings.min_support)
    signals = {e: found.get(e, empty) for e in batch.encounter_ids}
    return BatchSignals(signals, _query_frame(batch, queries, peers.peers))


def _query_frame(batch: PromptBatch, queries: PatientStates, peers: pd.DataFrame) -> pd.DataFrame:
    ordered = peers.sort_values(["encounter_id", "peer_rank"])
    grouped = ordered.groupby("encounter_id", sort=False)
    lists = grouped["peer_encounter_id"].apply(lambda s: [str(e) for e in s])
    kth = grouped["similarity"].min()
    keys = queries.keys.assign(encounter_id=queries.keys["encounter_id"].astype(str))
    out = pd.DataFrame(
        {
            "encounter_id": keys["encounter_id"].to_numpy(),
            "patient_id": keys["patient_id"].astype(str).to_numpy(),
        }
    )
    out["peer_encounter_ids"] = [lists.get(e, []) for e in out["encounter_id"]]
    out["kth_similarity"] = [float(kth.get(e, np.nan)) for e in out["encounter_id"]]
    out["n_peers"] = [len(p) for p in out["peer_encounter_ids"]]
    return out[list(QUERY_COLUMNS)]


def batch_prompts(plan: PromptPlan, batch: PromptBatch, signals: BatchSignals) -> pd.DataFrame:
    """The prompt-table rows of a batch (`promptenv.prompt_table.PROMPTS_SCHEMA` columns)."""
    ws = Workspace.at(plan.workspace)
    tables = _patient_rows(ws, batch.patient_ids)
    index = tables["index_encounters"]
    chosen = index[index["encounter_id"].isin(batch.encounter_ids)]
    policy = None
    if "pmlm" in plan.spec.methods:
        policy = load_policy(policy_dir(ws))
        if policy.version != plan.spec.policy_version:
            raise ValueError(
                f"the policy in {policy_dir(ws)} is {policy.version}, not {plan.spec.policy_version} "
                "that this prompt table was planned with: rerun the refine step"
            )
    frame = build_prompt_table(
        {**tables, "index_encounters": chosen},
        plan.spec.methods,
        lambda _ids: signals.signals,
        "all",
        plan.spec.config,
        policy=policy,
    )
    return frame


def _patient_rows(workspace: Workspace, patients: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The rows of ``patients`` in the tables a prompt reads (parquet filters: no full read)."""
    wanted = sorted(patients)
    out = {}
    for name in BATCH_TABLES:
        path = workspace.table_path(name)
        if not path.exists():
            workspace.read_table(name)  # raises the error that says which step writes it
        out[name] = pq.read_table(path, filters=[("patient_id", "in", wanted)]).to_pandas()
    return out


# --------------------------------------------------------------------------- write


def write_refreshed_table(
    plan: PromptPlan,
    prompts: Sequence[pd.DataFrame],
    signals: Sequence[BatchSignals],
) -> RefreshResult:
    """Merge the batches' rows into the prompt table, write it, then the refresh state.

    The table is written before the state, so a crash in between makes the next
    build recompute everyone (its table no longer matches the recorded one).
    """
    if len(prompts) != len(plan.batches) or len(signals) != len(plan.batches):
        raise ValueError(
            f"the plan has {len(plan.batches)} batches but {len(prompts)} prompt frames and "
            f"{len(signals)} signal results were given"
        )
    ws = Workspace.at(plan.workspace)
    recomputed = {p for b in plan.batches for p in b.patient_ids}
    drop = recomputed | set(plan.removed)
    new_rows = [frame for frame in prompts if len(frame)]
    columns = list(PROMPTS_SCHEMA.names)
    if plan.full_reason is None:
        kept = ws.read_table(PROMPT_TABLE)
        kept = kept[~kept["patient_id"].isin(drop)]
        queries = pd.read_parquet(refresh_dir(ws) / "queries.parquet")
        queries = queries[~queries["patient_id"].isin(drop)]
        parts = [kept, *new_rows]
    else:
        parts = list(new_rows)
        queries = pd.DataFrame({c: [] for c in QUERY_COLUMNS})
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    order = {m: i for i, m in enumerate(plan.spec.methods)}
    table = (
        table.assign(_method=table["method"].map(order))
        .sort_values(["patient_id", "index_time", "encounter_id", "_method"], kind="stable")
        .drop(columns="_method")
        .reset_index(drop=True)[columns]
    )
    unchanged = plan.full_reason is None and not plan.batches and not plan.removed
    if not unchanged:  # an unchanged table keeps its file (and its sha256)
        write_prompt_table(ws, table)
    new_queries = [s.queries for s in signals if len(s.queries)]
    queries = pd.concat([queries, *new_queries], ignore_index=True)

    state = refresh_dir(ws)
    _write_frame(state / "patients.parquet", pd.read_parquet(plan.run_dir / "records.parquet"))
    _write_frame(state / "states.parquet", pd.read_parquet(plan.run_dir / "states.parquet"))
    _write_frame(state / "queries.parquet", queries.sort_values("encounter_id"))
    path = ws.table_path(PROMPT_TABLE)
    build = {
        "spec": plan.spec.identity(),
        "model": plan.model,
        "model_fingerprint": plan.model_fingerprint,
        "table_sha256": file_sha256(path),
        "rows": len(table),
        "patients": plan.patients,
        "recomputed_patients": len(recomputed),
        "reasons": dict(plan.reasons),
        "removed": len(plan.removed),
        "full_reason": plan.full_reason,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_bytes(state / "build.json", json.dumps(build, indent=2).encode())
    # this run's states, and those a crashed run left (one build at a time per workspace)
    for run_dir in state.glob("run-*"):
        shutil.rmtree(run_dir)
    ws.record_step(
        "prompts",
        {k: build[k] for k in ("model", "rows", "patients", "recomputed_patients", "full_reason")}
        | {"methods": list(plan.spec.methods), "which": plan.spec.which, "output": str(path)},
    )
    return RefreshResult(
        path=path,
        recommender=plan.model,
        rows=len(table),
        patients=plan.patients,
        recomputed_patients=len(recomputed),
        reasons=dict(plan.reasons),
        removed=len(plan.removed),
        full_reason=plan.full_reason,
        batches=len(plan.batches),
    )


def refresh_prompt_table(
    workspace: Workspace,
    spec: PromptTableSpec | None = None,
    *,
    full: bool = False,
    progress: Progress | None = None,
) -> RefreshResult:
    """Plan, compute every batch in turn, and write: the whole build in this process.

    The recommender is not refit (see the module docstring).
    """
    say = progress or (lambda _m: None)
    plan = plan_prompt_table(workspace, spec, full=full)
    say(plan.describe())
    signals, prompts = [], []
    for batch in plan.batches:
        signals.append(batch_signals(plan, batch))
        prompts.append(batch_prompts(plan, batch, signals[-1]))
    return write_refreshed_table(plan, prompts, signals)


# --------------------------------------------------------------------------- helpers


def _load_model(workspace: Workspace, name: str) -> Recommender:
    model = load_recommender(models_dir(workspace) / name)
    if model.vocab is None:
        raise ValueError(f"recommender {name} has no vocabulary: refit it with `pmlm recsys fit`")
    return model


def _check_model(workspace: Workspace, plan: PromptPlan) -> None:
    now = files_fingerprint(models_dir(workspace))
    if now != plan.model_fingerprint:
        raise RuntimeError(
            f"the recommenders in {models_dir(workspace)} changed after the prompt table was "
            "planned (a fit ran meanwhile): run the build again"
        )


def _write_frame(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = [
    "BatchSignals",
    "PromptBatch",
    "PromptPlan",
    "PromptTableSpec",
    "RefreshResult",
    "batch_prompts",
    "batch_signals",
    "plan_prompt_table",
    "refresh_dir",
    "refresh_prompt_table",
    "write_refreshed_table",
]
