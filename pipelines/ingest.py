"""From source tables to a complete workspace: derive plans and index encounters, write, summarize.

This is the one place where every source meets: FHIR and OMOP readers return
`SourceTables`; `write_cohort` derives reference plans and index encounters the
same way for both and writes all canonical tables.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.errors import InputError
from pipelines.identity import workspace_salt, write_crosswalk
from pipelines.index import DEFAULT_SPLIT_SEED, index_encounters
from pipelines.plans import plan_headers, plans_from_notes, plans_from_orders
from pipelines.schemas import EVENT_KINDS, ROW_ORDER, SPLITS, TABLES
from pipelines.sources import SOURCE_ID_COLUMN, SourceTables
from pipelines.workspace import Workspace, to_arrow, transactional

#: ``--plans`` choices → ``derive``'s ``plans_from``.
PLAN_SOURCES: dict[str, str] = {"notes": "note", "orders": "events", "auto": "auto"}


def plan_choice(plans: str) -> str:
    """``derive``'s ``plans_from`` for a ``--plans`` choice (notes, orders, auto)."""
    if plans not in PLAN_SOURCES:
        raise InputError(f"--plans must be one of {', '.join(PLAN_SOURCES)}, not {plans!r}")
    return PLAN_SOURCES[plans]


def _plans(
    source: SourceTables, plans_from: str, headers: Sequence[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    if plans_from == "note":
        return plans_from_notes(source.notes, source.events, headers)
    if plans_from == "events":
        return plans_from_orders(source.events, source.encounters)
    if plans_from != "auto":
        raise ValueError(f"plans_from must be 'note', 'events' or 'auto', not {plans_from!r}")
    noted, noted_items = plans_from_notes(source.notes, source.events, headers)
    ordered, ordered_items = plans_from_orders(source.events, source.encounters)
    extra = ~ordered["encounter_id"].isin(noted["encounter_id"])
    extra_items = ordered_items["encounter_id"].isin(ordered.loc[extra, "encounter_id"])
    frames = [noted, ordered[extra]]
    plans = pd.concat([f for f in frames if len(f)] or frames[:1], ignore_index=True)
    item_frames = [noted_items, ordered_items[extra_items]]
    items = pd.concat([f for f in item_frames if len(f)] or item_frames[:1], ignore_index=True)
    return plans, items


def derive(
    source: SourceTables,
    split_seed: int = DEFAULT_SPLIT_SEED,
    plans_from: str | None = None,
    plan_headers: Sequence[str] | None = None,
) -> dict[str, pd.DataFrame]:
    """All canonical tables from record-level tables.

    Reference plans come from the notes (``plans_from="note"``), from the orders
    recorded at each encounter (``"events"``), or per encounter from its note
    where the parser finds a plan there, else from its orders (``"auto"``); by
    default (None) from the notes when the source has any, else from the orders.
    ``plan_headers``: the titles of a note's plan section (`pipelines.plans.plan_headers`).
    Every derived row depends on one patient's records only, so a cohort can be
    derived in parts (`pipelines.staged`).
    """
    if plans_from is None:
        plans_from = "note" if len(source.notes) else "events"
    plans, items = _plans(source, plans_from, plan_headers)
    plans, items = (
        df.sort_values(ROW_ORDER[name], kind="stable", na_position="first").reset_index(drop=True)
        for name, df in (("reference_plans", plans), ("plan_items", items))
    )
    index = index_encounters(
        source.encounters, source.events, source.patients, plans, split_seed=split_seed
    )
    return {
        "patients": source.patients,
        "encounters": source.encounters,
        "events": source.events,
        "notes": source.notes,
        "reference_plans": plans,
        "plan_items": items,
        "index_encounters": index,
        "quarantine": source.quarantine,
    }


#: The record-level tables, whose content makes the data hash.
HASHED_TABLES = ("patients", "encounters", "events", "notes")
_HASH_BATCH = 1 << 16


def row_hashes(table: pa.Table) -> np.ndarray:
    """A 64-bit hash of each row of a canonical table (pandas' hash of its values).

    A row's hash depends on that row alone, so the hashes of a table's parts, put
    in the table's order, are the hashes of the table.
    """
    parts = [
        pd.util.hash_pandas_object(batch.to_pandas(), index=False).to_numpy()
        for batch in table.to_batches(max_chunksize=_HASH_BATCH)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def content_hash(hashes: Mapping[str, np.ndarray]) -> str:
    """The data hash: of the rows (`row_hashes`, in canonical order) of `HASHED_TABLES`."""
    h = hashlib.sha256()
    for name in HASHED_TABLES:
        h.update(name.encode())
        h.update(np.ascontiguousarray(hashes[name], dtype="<u8").tobytes())
    return h.hexdigest()[:16]


def record_ingest(
    workspace: Workspace,
    *,
    input_description: str,
    split_seed: int,
    data_hash: str,
    summary: dict[str, Any],
) -> None:
    workspace.record_step(
        "ingest",
        {
            "input": input_description,
            "split_seed": split_seed,
            "data_hash": data_hash,
            "summary": summary,
        },
    )


@transactional("ingest")
def write_cohort(
    workspace: Workspace,
    source: SourceTables,
    *,
    input_description: str,
    split_seed: int = DEFAULT_SPLIT_SEED,
    plans: str = "auto",
    plan_headers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Derive and write every canonical table, record the step, and return the summary.

    ``plans``: where reference plans come from (`PLAN_SOURCES`: notes, orders, auto);
    ``plan_headers``: the titles of a note's plan section (`pipelines.plans.plan_headers`).
    """
    tables = derive(
        source, split_seed=split_seed, plans_from=plan_choice(plans), plan_headers=plan_headers
    )
    if SOURCE_ID_COLUMN in source.patients.columns:
        # each patient's source system is her row's own (a snapshot's: the one it was read from)
        crosswalk = source.patients[["source", "patient_id", SOURCE_ID_COLUMN]].rename(
            columns={"source": "source_system", SOURCE_ID_COLUMN: "source_id"}
        )
        write_crosswalk(workspace, crosswalk, None, None)
    hashes = {}
    for name in TABLES:
        table = to_arrow(name, tables[name])
        workspace.write_table(name, table)
        if name in HASHED_TABLES:
            hashes[name] = row_hashes(table)
    summary = summarize(tables, source.summary.as_dict(), plan_headers)
    record_ingest(
        workspace,
        input_description=input_description,
        split_seed=split_seed,
        data_hash=content_hash(hashes),
        summary=summary,
    )
    return summary


def summarize(
    tables: dict[str, pd.DataFrame],
    ingest: dict[str, Any] | None = None,
    headers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Counts a data scientist checks first; every figure is computed from the tables."""
    idx = tables["index_encounters"]
    events = tables["events"]
    by_kind = events["kind"].value_counts()
    by_split = {s: int((idx["split"] == s).sum()) for s in SPLITS}
    ob = idx[idx["is_obstetric"]]
    patients_by_split = {s: int(idx.loc[idx["split"] == s, "patient_id"].nunique()) for s in SPLITS}
    summary: dict[str, Any] = {
        "patients": len(tables["patients"]),
        "encounters": len(tables["encounters"]),
        "events": len(events),
        "events_by_kind": {k: int(by_kind.get(k, 0)) for k in EVENT_KINDS},
        "notes": len(tables["notes"]),
        "reference_plans": len(tables["reference_plans"]),
        "plan_sources": tables["reference_plans"]["plan_source"].value_counts().to_dict(),
        "plan_items": len(tables["plan_items"]),
        "distinct_plan_items": int(tables["plan_items"]["item_key"].nunique()),
        "index_encounters": len(idx),
        "index_encounters_by_split": by_split,
        "patients_with_index_by_split": patients_by_split,
        "obstetric_index_encounters": len(ob),
        "obstetric_share": round(len(ob) / len(idx), 4) if len(idx) else 0.0,
        "obstetric_by_split": {s: int((ob["split"] == s).sum()) for s in SPLITS},
        "adult_index_encounters": int(idx["is_adult"].sum()),
        "quarantined": len(tables["quarantine"]),
        "quarantine_reasons": _reason_counts(tables["quarantine"]),
    }
    if len(tables["notes"]) == 0:
        summary["remark"] = (
            "this source has no clinical notes: reference plans are the orders recorded "
            "at the next encounter (plan_source = 'events'), not a physician's written plan"
        )
    if len(tables["reference_plans"]) == 0:
        summary["remark"] = no_plan_reason(tables, headers)
    if ingest is not None:
        summary["ingest"] = ingest
    return summary


def no_plan_reason(tables: dict[str, pd.DataFrame], headers: Sequence[str] | None = None) -> str:
    """Why no reference plan was derived (a summary never shows a silent zero)."""
    events = tables["events"]
    orders = events["encounter_id"].notna() & events["kind"].isin(
        ["procedure", "medication", "immunization", "careplan", "observation"]
    )
    notes = tables["notes"]
    return (
        f"no reference plan could be derived: {len(notes)} notes, none with a plan section "
        f"headed {' or '.join(repr(h) for h in plan_headers(headers))} (pipelines/plans.py), "
        f"and {int(orders.sum())} orders recorded at an encounter"
        + (
            ": choose --plans orders, or name the notes' plan headers with --plan-header"
            if orders.any() and len(notes)
            else ""
        )
        + (
            ": name the notes' plan section headers with --plan-header"
            if len(notes) and not orders.any()
            else ""
        )
        + (
            "; every index encounter needs a next encounter with a plan"
            if not orders.any() and not len(notes)
            else ""
        )
    )


def _reason_counts(quarantine: pd.DataFrame) -> dict[str, int]:
    if quarantine.empty:
        return {}
    # Group reasons by their stable prefix (ids and values vary).
    prefix = quarantine["reason"].str.replace(r"\s+(\S*[0-9a-f]{8}\S*|'.*')$", "", regex=True)
    return {str(k): int(v) for k, v in prefix.value_counts().items()}


def load_tables(
    workspace: Workspace, names: tuple[str, ...] | None = None
) -> dict[str, pd.DataFrame]:
    """Read canonical tables from a workspace (all by default), of one published state."""
    return workspace.read_tables(names or tuple(TABLES))


@transactional("ingest")
def ingest_fhir(
    workspace: Workspace,
    folder: Path,
    split_seed: int = DEFAULT_SPLIT_SEED,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    fmt: str = "auto",
    plans: str = "auto",
    plan_headers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Read a FHIR input (bundles, or a Bulk Data export: ``fmt``) into the workspace;
    returns the summary.

    Staged (`pipelines.staged`): each worker process holds one chunk of bundles;
    this process about two copies of the largest table (events), not the cohort.
    ``progress(files_read, files)`` follows the reading. ``plans`` (notes, orders,
    auto) and ``plan_headers``: where reference plans come from (`write_cohort`).
    The patients' direct identifiers go to the deny-list (`pipelines.identifiers`),
    collected by the workers as they read (each file is read once).
    """
    from pipelines.staged import ingest_fhir_staged

    return ingest_fhir_staged(
        workspace,
        folder,
        split_seed=split_seed,
        workers=workers,
        fmt=fmt,
        plans=plans,
        plan_headers=plan_headers,
        progress=progress,
    )


def ingest_omop(
    workspace: Workspace,
    path: Path | str | None,
    split_seed: int = DEFAULT_SPLIT_SEED,
    cdm_schema: str | None = None,
    plans: str = "auto",
    plan_headers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Read an OMOP CDM (DuckDB file, CSV folder or database URL with its ``cdm_schema``;
    None → Eunomia) into the workspace; returns the summary."""
    from pipelines.omop import eunomia_path, is_url, read_omop

    where = path if path is not None else eunomia_path()
    source = read_omop(where, salt=workspace_salt(workspace), cdm_schema=cdm_schema)
    shown = (
        source.patients["source_file"].iloc[0] if is_url(where) and len(source.patients) else where
    )
    return write_cohort(
        workspace,
        source,
        input_description=f"omop:{shown}",
        split_seed=split_seed,
        plans=plans,
        plan_headers=plan_headers,
    )
