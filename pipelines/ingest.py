"""From source tables to a complete workspace: derive plans and index encounters, write, summarize.

This is the one place where every source meets: FHIR and OMOP readers return
`SourceTables`; `write_cohort` derives reference plans and index encounters the
same way for both and writes all canonical tables.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.index import DEFAULT_SPLIT_SEED, index_encounters
from pipelines.plans import plans_from_notes, plans_from_orders
from pipelines.schemas import EVENT_KINDS, SPLITS, TABLES
from pipelines.sources import SourceTables
from pipelines.workspace import Workspace


def derive(source: SourceTables, split_seed: int = DEFAULT_SPLIT_SEED) -> dict[str, pd.DataFrame]:
    """All canonical tables from record-level tables: plans from notes, else from orders."""
    if len(source.notes):
        plans, items = plans_from_notes(source.notes, source.events)
    else:
        plans, items = plans_from_orders(source.events, source.encounters)
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


def content_hash(tables: dict[str, pd.DataFrame]) -> str:
    """A hash of the record-level tables' content: equal inputs give equal hashes."""
    h = hashlib.sha256()
    for name in ("patients", "encounters", "events", "notes"):
        frame = tables[name]
        h.update(name.encode())
        h.update(pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def write_cohort(
    workspace: Workspace,
    source: SourceTables,
    *,
    input_description: str,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> dict[str, Any]:
    """Derive and write every canonical table, record the step, and return the summary."""
    tables = derive(source, split_seed=split_seed)
    for name in TABLES:
        workspace.write_table(name, tables[name])
    summary = summarize(tables, source.summary.as_dict())
    workspace.record_step(
        "ingest",
        {
            "input": input_description,
            "split_seed": split_seed,
            "data_hash": content_hash(tables),
            "summary": summary,
        },
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
    """Read canonical tables from a workspace (all by default)."""
    return {name: workspace.read_table(name) for name in (names or tuple(TABLES))}


def ingest_fhir(
    workspace: Workspace, folder: Path, split_seed: int = DEFAULT_SPLIT_SEED
) -> dict[str, Any]:
    """Read a folder of FHIR R4 bundles into the workspace; returns the summary."""
    from pipelines.fhir import read_fhir_folder

    source = read_fhir_folder(folder)
    return write_cohort(
        workspace, source, input_description=f"fhir:{folder}", split_seed=split_seed
    )


def ingest_omop(
    workspace: Workspace, path: Path | None, split_seed: int = DEFAULT_SPLIT_SEED
) -> dict[str, Any]:
    """Read an OMOP CDM (DuckDB file or CSV folder; None → Eunomia) into the workspace."""
    from pipelines.omop import eunomia_path, read_omop

    path = path if path is not None else eunomia_path()
    source = read_omop(path)
    return write_cohort(workspace, source, input_description=f"omop:{path}", split_seed=split_seed)
