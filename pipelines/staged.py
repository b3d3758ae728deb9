"""A FHIR folder into a workspace without holding the cohort in memory.

`write_cohort(read_fhir_folder(...))` holds every table of the cohort, and the
intermediate objects of deriving plans, in one process: 2.7 GB for 1,000
Synthea women. This module writes the same tables in three steps:

1. **Stage.** Worker processes read chunks of ``CHUNK_FILES`` bundles. For its
   chunk, a worker sorts the record tables, derives reference plans and index
   encounters (each derived row depends on one patient's records only), hashes
   every row, and writes each table as an Arrow file in a staging folder inside
   the workspace. It returns the ingest counts, a 128-bit hash of every
   record's id, and its patients' direct identifiers (the deny-list,
   `pipelines.identifiers`), so that no file is read twice.
2. **Duplicates.** Ids repeated across chunks are found from those hashes; the
   first occurrence is kept, as one reader would. The patients who hold such an
   id are derived again, together, from their staged rows. A clean cohort has
   none.
3. **Assemble**, one table at a time: its staged parts are memory-mapped,
   concatenated, sorted in the canonical row order (`schemas.ROW_ORDER`) and
   written. Peak memory is about two copies of the largest table (events), so
   it still grows with the cohort: 868 MB in this process for 1,000 women,
   against 2,279 MB in memory (BENCHMARKS.md). An external sort would bound
   it; that is not done.

The written tables, the data hash and the summary equal those of
`write_cohort(workspace, read_fhir_folder(folder))`; tests hold the two to it.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.fhir import (
    FILE_COLUMN,
    ID_COLUMNS,
    SOURCE_ID_COLUMN,
    dedupe,
    map_chunks,
    merge_summaries,
    prepare_input,
    read_chunk,
    sorted_tables,
    typed,
    worker_pool,
)
from pipelines.fhir.merge import FIRST_COLUMN, REPEAT_COLUMN, content_hashes, resolve_duplicates
from pipelines.identifiers import PatientIdentifiers, merge_identifiers, write_identifiers
from pipelines.identity import workspace_salt, write_crosswalk
from pipelines.index import DEFAULT_SPLIT_SEED
from pipelines.ingest import (
    HASHED_TABLES,
    content_hash,
    derive,
    plan_choice,
    record_ingest,
    row_hashes,
    summarize,
)
from pipelines.plans import plan_headers as plan_headers_of
from pipelines.schemas import QUARANTINE, ROW_ORDER, TABLES
from pipelines.sources import IngestSummary, SourceTables, frame
from pipelines.workspace import Workspace, to_arrow, transactional

RECORD_TABLES = ("patients", "encounters", "events", "notes")
DERIVED_TABLES = ("reference_plans", "plan_items", "index_encounters")
#: Internal column of staged parts: the row's hash (`ingest.row_hashes`).
HASH_COLUMN = "_hash"
#: Two keys of pandas' 64-bit hash: together a 128-bit hash of an id.
_ID_KEYS = ("pmlm-staged-id-1", "pmlm-staged-id-2")
#: The columns `ingest.summarize` reads (None: all).
_SUMMARY_COLUMNS: dict[str, list[str] | None] = {
    "patients": ["patient_id"],
    "encounters": ["encounter_id"],
    "events": ["kind", "encounter_id"],  # encounter_id: `no_plan_reason` counts orders
    "notes": ["note_id"],
    "reference_plans": ["plan_source"],
    "plan_items": ["item_key"],
    "index_encounters": None,
}


@dataclass
class StagedChunk:
    """What a worker returns for one chunk; its tables are in the staging folder."""

    first_file: int
    summary: IngestSummary
    quarantine: pd.DataFrame
    n_notes: int
    #: record table → ``h1``, ``h2`` (hash of the id), ``content`` (hash of the row),
    #: ``file`` (its origin) and ``patient`` (a number in ``patient_ids``), one row per
    #: staged row, in order
    ids: dict[str, pd.DataFrame]
    patient_ids: np.ndarray
    #: pseudonym → direct identifiers of the chunk's Patients (`pipelines.identifiers`)
    identifiers: dict[str, PatientIdentifiers]


def _id_hashes(values: pd.Series) -> pd.DataFrame:
    h1, h2 = (pd.util.hash_pandas_object(values, index=False, hash_key=k) for k in _ID_KEYS)
    return pd.DataFrame({"h1": h1.to_numpy(), "h2": h2.to_numpy()})


def _part_table(name: str, frame: pd.DataFrame) -> pa.Table:
    """A table in its canonical schema plus the internal columns staging needs."""
    table = to_arrow(name, frame)
    if name in HASHED_TABLES:
        table = table.append_column(HASH_COLUMN, pa.array(row_hashes(table), pa.uint64()))
    if name in RECORD_TABLES:
        table = table.append_column(FILE_COLUMN, pa.array(frame[FILE_COLUMN], pa.int64()))
    if name == "patients":
        table = table.append_column(
            SOURCE_ID_COLUMN, pa.array(frame[SOURCE_ID_COLUMN], pa.string())
        )
    return table.replace_schema_metadata(None)


def _part_path(staging: Path, name: str, first_file: int) -> Path:
    return staging / name / f"{first_file:08d}.arrow"


def _write_part(staging: Path, name: str, first_file: int, table: pa.Table) -> None:
    path = _part_path(staging, name, first_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_part(staging: Path, name: str, first_file: int) -> pa.Table:
    """A staged part, memory-mapped (uncompressed Arrow: no copy until used)."""
    source = pa.memory_map(str(_part_path(staging, name, first_file)), "r")
    return pa.ipc.open_file(source).read_all()


def stage_chunk(
    paths: list[Path],
    salt: str | None,
    names: list[str],
    split_seed: int,
    plans_from: str | None,
    headers: tuple[str, ...] | None,
    staging: Path,
    first_file: int,
) -> StagedChunk:
    """Read, sort, derive, hash and stage one chunk of units (runs in a worker)."""
    source = sorted_tables(read_chunk(paths, salt, names, first_file))
    # Every row is staged; the derived rows of a chunk with repeated ids are replaced
    # later (`_rederive`), but they are derived from one occurrence of each.
    unique = dedupe(dataclasses.replace(source, summary=IngestSummary(source="fhir")), names)
    derived = derive(unique, split_seed=split_seed, plans_from=plans_from, plan_headers=headers)
    del unique
    ids = {}
    patient_ids = pd.unique(source.patients["patient_id"].to_numpy(dtype=object))
    for name in RECORD_TABLES:
        frame: pd.DataFrame = getattr(source, name)
        key = ID_COLUMNS[name][0]
        # every row's patient was read in this chunk (references resolve within a file)
        patient = pd.Index(patient_ids).get_indexer(frame["patient_id"]).astype(np.int32)
        if (patient < 0).any():  # cannot happen while references resolve within a file
            raise RuntimeError(f"{name} rows of a patient not read in files {paths[0]}…")
        ids[name] = _id_hashes(frame[key]).assign(
            content=content_hashes(name, frame),
            file=frame[FILE_COLUMN].to_numpy(dtype=np.int64),
            patient=patient,
        )
        _write_part(staging, name, first_file, _part_table(name, frame))
        setattr(source, name, None)  # memory: one table's copy at a time
    for name in DERIVED_TABLES:
        _write_part(staging, name, first_file, _part_table(name, derived[name]))
    return StagedChunk(
        first_file=first_file,
        summary=source.summary,
        quarantine=source.quarantine,
        n_notes=len(ids["notes"]),
        ids=ids,
        patient_ids=patient_ids,
        identifiers=source.identifiers,
    )


Drops = dict[str, dict[tuple[int, int], tuple[bool, int]]]


def _duplicates(chunks: list[StagedChunk]) -> tuple[Drops, set[str]]:
    """Rows to drop per record table: later occurrences of an id, as (first file of
    chunk, row) → (an identical repeat?, origin of the first occurrence); and the
    patients holding a repeated id (all occurrences)."""
    drops: Drops = {}
    affected: set[str] = set()
    for name in RECORD_TABLES:
        ids = pd.concat(
            [
                c.ids[name].assign(chunk=i, row=np.arange(len(c.ids[name]), dtype=np.int64))
                for i, c in enumerate(chunks)
            ],
            ignore_index=True,
        )
        # the input order decides which occurrence is first (staged rows are sorted)
        ids = ids.sort_values("file", kind="stable", ignore_index=True)
        later = ids.duplicated(["h1", "h2"], keep="first")
        if later.any():
            every = ids[ids.duplicated(["h1", "h2"], keep=False)]
            for i, patient in zip(every["chunk"], every["patient"], strict=True):
                affected.add(str(chunks[i].patient_ids[patient]))
            by_id = [ids["h1"].to_numpy(), ids["h2"].to_numpy()]
            first_content = ids["content"].groupby(by_id, sort=False).transform("first")
            first_file = ids["file"].groupby(by_id, sort=False).transform("first")
            repeat = ids["content"] == first_content
            drops[name] = {
                (chunks[i].first_file, int(row)): (bool(same), int(first))
                for i, row, same, first in zip(
                    ids.loc[later, "chunk"],
                    ids.loc[later, "row"],
                    repeat[later],
                    first_file[later],
                    strict=True,
                )
            }
    return drops, affected


def _rederive(
    staging: Path,
    chunks: list[StagedChunk],
    drops: Drops,
    affected: pa.Array,
    file_names: list[str],
    summary: IngestSummary,
    split_seed: int,
    plans_from: str,
    headers: tuple[str, ...] | None,
) -> tuple[dict[str, pa.Table], pd.DataFrame]:
    """The tables of the patients who hold a repeated id, derived again from their
    staged rows without the later occurrences; and the quarantine rows of those."""
    frames: dict[str, pd.DataFrame] = {}
    quarantine: list[dict[str, Any]] = []
    for name in RECORD_TABLES:
        pieces = []
        for c in chunks:
            part = _read_part(staging, name, c.first_file)
            rows = pc.indices_nonzero(pc.is_in(part["patient_id"], value_set=affected))
            piece = part.take(rows).drop_columns([HASH_COLUMN] if name in HASHED_TABLES else [])
            piece = piece.to_pandas()
            dropped = drops.get(name, {})
            marks = [dropped.get((c.first_file, r)) for r in rows.to_numpy()]
            later = np.array([m is not None for m in marks], dtype=bool)
            if later.any():
                found = [m for m in marks if m is not None]
                rows_later = piece[later].assign(
                    **{
                        REPEAT_COLUMN: [m[0] for m in found],
                        FIRST_COLUMN: [m[1] for m in found],
                    }
                )
                quarantine.extend(resolve_duplicates(name, rows_later, file_names, summary))
            pieces.append(piece[~later])
        kept = pd.concat(pieces, ignore_index=True)
        # An empty Arrow-backed string column has no chunks, which pandas' merges
        # reject; give an empty table the reader's own empty frame instead.
        columns = list(kept.columns)
        frames[name] = kept if len(kept) else typed(frame([], columns), columns)
    source = sorted_tables(
        SourceTables(
            **frames,
            quarantine=pd.DataFrame(columns=QUARANTINE.names),
            summary=summary,
        )
    )
    derived = derive(source, split_seed=split_seed, plans_from=plans_from, plan_headers=headers)
    tables = {name: _part_table(name, getattr(source, name)) for name in RECORD_TABLES}
    tables.update({name: _part_table(name, derived[name]) for name in DERIVED_TABLES})
    return tables, pd.DataFrame(quarantine, columns=QUARANTINE.names)


def _assemble(
    staging: Path,
    name: str,
    chunks: list[StagedChunk],
    affected: pa.Array | None,
    replacement: pa.Table | None,
) -> pa.Table:
    """One table from its staged parts, in canonical row order (with internal columns)."""
    parts = []
    for c in chunks:
        part = _read_part(staging, name, c.first_file)
        if affected is not None:
            part = part.filter(pc.invert(pc.is_in(part["patient_id"], value_set=affected)))
        parts.append(part)
    if replacement is not None:
        parts.append(replacement)
    table = pa.concat_tables(parts)
    del parts
    # Arrow's sort is stable and puts missing values first, like the in-memory
    # `sort_values(..., kind="stable", na_position="first")`
    order = pc.sort_indices(
        table, sort_keys=[(key, "ascending", "at_start") for key in ROW_ORDER[name]]
    )
    return table.take(order)


@transactional("ingest")  # the lock covers the staging folder; all tables publish together
def ingest_fhir_staged(
    workspace: Workspace,
    folder: Path,
    *,
    split_seed: int = DEFAULT_SPLIT_SEED,
    salt: str | None = None,
    workers: int | None = None,
    chunk_files: int | None = None,
    fmt: str = "auto",
    plans: str = "auto",
    plan_headers: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Read a FHIR input (bundles or a Bulk Data export, `pipelines.fhir`) into
    ``workspace`` (every canonical table); record the step and return the summary.
    ``progress(files_read, files)`` follows the reading (`pipelines.fhir.map_chunks`).

    ``workers`` processes (default: the number of CPUs) stage chunks of
    ``chunk_files`` bundles (default ``fhir.CHUNK_FILES``; a Bulk Data export: one
    part of ``bulk.PATIENTS_PER_PART`` patients); neither changes the result.
    ``plans``: where reference plans come from (`pipelines.ingest.PLAN_SOURCES`);
    ``plan_headers``: the titles of a note's plan section (`pipelines.plans.plan_headers`).
    The deny-list (``private/identifiers.json``) is written from the identifiers the
    workers collected. The staging folder, ``WORKSPACE/.staging/ingest-*``, is removed at the end,
    also on error (and ``.staging`` when empty); one left by a killed ingest is
    removed by the next.
    """
    plans_from = plan_choice(plans)
    headers = plan_headers_of(plan_headers) if plan_headers is not None else None
    salt = salt if salt is not None else workspace_salt(workspace)
    root = workspace.root / ".staging"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("ingest-*"):  # left by a killed ingest (one ingest per workspace)
        shutil.rmtree(stale)
    staging = Path(tempfile.mkdtemp(dir=root, prefix="ingest-"))
    try:
        with worker_pool(workers) as pool:  # the partition pass and the reading share it
            prepared = prepare_input(Path(folder), fmt, staging / "bulk", pool)
            file_names = prepared.names
            chunks = map_chunks(
                stage_chunk,
                prepared.chunks(chunk_files),
                salt,
                file_names,
                split_seed,
                plans_from,
                headers,
                staging,
                workers=workers,
                progress=progress,
                pool=pool,
            )
        summary = merge_summaries([prepared.before.summary] + [c.summary for c in chunks])
        quarantines = [prepared.before.quarantine] + [c.quarantine for c in chunks]
        derived_chunks = chunks

        drops, held = _duplicates(chunks)
        affected = pa.array(sorted(held), pa.string()) if held else None
        replacements: dict[str, pa.Table] = {}
        if affected is not None:
            replacements, extra = _rederive(
                staging,
                chunks,
                drops,
                affected,
                file_names,
                summary,
                split_seed,
                plans_from,
                headers,
            )
            quarantines.append(extra)

        hashes: dict[str, np.ndarray] = {}
        light: dict[str, pd.DataFrame] = {}
        for name in (*RECORD_TABLES, *DERIVED_TABLES):
            table = _assemble(
                staging,
                name,
                chunks if name in RECORD_TABLES else derived_chunks,
                affected,
                replacements.get(name),
            )
            if name in HASHED_TABLES:
                hashes[name] = table[HASH_COLUMN].to_numpy()
            if name == "patients":
                crosswalk = table.select(["patient_id", SOURCE_ID_COLUMN]).to_pandas()
                crosswalk = crosswalk.rename(columns={SOURCE_ID_COLUMN: "source_id"})
                write_crosswalk(workspace, crosswalk.assign(source_system="fhir"), file_names, salt)
            table = table.select(TABLES[name].names)
            workspace.write_table(name, table)
            columns = _SUMMARY_COLUMNS[name]
            light[name] = (table if columns is None else table.select(columns)).to_pandas()
            del table
        quarantine = pd.concat(quarantines, ignore_index=True).sort_values(
            ROW_ORDER["quarantine"], kind="stable", na_position="first"
        )
        light["quarantine"] = quarantine.reset_index(drop=True)
        identifiers: dict[str, PatientIdentifiers] = {}
        for c in chunks:  # in input order, as one reader would meet them
            merge_identifiers(identifiers, c.identifiers)
        write_identifiers(workspace, identifiers)  # the deny-list, from the one reading
        workspace.write_table("quarantine", light["quarantine"])
        result = summarize(light, summary.as_dict(), headers)
        record_ingest(
            workspace,
            input_description=f"fhir:{folder}",
            split_seed=split_seed,
            data_hash=content_hash(hashes),
            summary=result,
        )
        return result
    finally:
        try:
            shutil.rmtree(staging)
            if not any(root.iterdir()):
                root.rmdir()
        except OSError as exc:
            warnings.warn(
                f"could not remove the staging folder {staging} ({exc}); delete it by hand",
                stacklevel=2,
            )
