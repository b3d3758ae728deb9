"""From source tables to a complete workspace: derive plans and index encounters, write, summarize.

This is the one place where every source meets: FHIR and OMOP readers return
`SourceTables`; `write_cohort` derives reference plans and index encounters the
same way for both and writes all canonical tables.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.index import DEFAULT_SPLIT_SEED, index_encounters
from pipelines.plans import plans_from_notes, plans_from_orders
from pipelines.schemas import EVENT_KINDS, ROW_ORDER, SPLITS, TABLES
from pipelines.sources import SourceTables
from pipelines.workspace import Workspace, to_arrow, transactional


def derive(
    source: SourceTables, split_seed: int = DEFAULT_SPLIT_SEED, plans_from: str | None = None
) -> dict[str, pd.DataFrame]:
    """All canonical tables from record-level tables.

    Reference plans come from the notes (``plans_from="note"``) or from the orders
    recorded at each encounter (``"events"``); by default from the notes when the
    source has any. Every derived row depends on one patient's records only, so a
    cohort can be derived in parts (`pipelines.staged`).
    """
    if plans_from is None:
        plans_from = "note" if len(source.notes) else "events"
    if plans_from == "note":
        plans, items = plans_from_notes(source.notes, source.events)
    elif plans_from == "events":
        plans, items = plans_from_orders(source.events, source.encounters)
    else:
        raise ValueError(f"plans_from must be 'note' or 'events', not {plans_from!r}")
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
) -> dict[str, Any]:
    """Derive and write every canonical table, record the step, and return the summary;
    all published together (one transaction)."""
    tables = derive(source, split_seed=split_seed)
    hashes = {}
    for name in TABLES:
        table = to_arrow(name, tables[name])
        workspace.write_table(name, table)
        if name in HASHED_TABLES:
            hashes[name] = row_hashes(table)
    summary = summarize(tables, source.summary.as_dict())
    record_ingest(
        workspace,
        input_description=input_description,
        split_seed=split_seed,
        data_hash=content_hash(hashes),
        summary=summary,
    )
    return summary


def summarize(
    tables: dict[str, pd.DataFrame], ingest: dict[str, Any] | None = None
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
    if ingest is not None:
        summary["ingest"] = ingest
    return summary


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
) -> dict[str, Any]:
    """Read a folder of FHIR R4 bundles into the workspace; returns the summary.

    Staged (`pipelines.staged`): each worker process holds one chunk of bundles;
    this process about two copies of the largest table (events), not the cohort.
    The patients' direct identifiers go to the deny-list (`pipelines.identifiers`).
    """
    from pipelines.fhir import bundle_files
    from pipelines.identifiers import fhir_identifiers, write_identifiers
    from pipelines.staged import ingest_fhir_staged

    summary = ingest_fhir_staged(workspace, folder, split_seed=split_seed, workers=workers)
    write_identifiers(workspace, fhir_identifiers(bundle_files(folder)))  # the deny-list
    return summary


def ingest_omop(
    workspace: Workspace, path: Path | None, split_seed: int = DEFAULT_SPLIT_SEED
) -> dict[str, Any]:
    """Read an OMOP CDM (DuckDB file or CSV folder; None → Eunomia) into the workspace."""
    from pipelines.omop import eunomia_path, read_omop

    path = path if path is not None else eunomia_path()
    source = read_omop(path)
    return write_cohort(workspace, source, input_description=f"omop:{path}", split_seed=split_seed)
