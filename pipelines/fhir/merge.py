"""Chunks of units → one set of tables: repeated ids, counts, canonical row order.

Units are read in chunks, by one process or many (`map_chunks`); the result
does not depend on how: an id read twice keeps its first occurrence (in input
order) and its later occurrences are

- **identical repeats** when every column PMLM reads is the same (a document
  bundle repeats the resources of another): dropped, and counted in
  ``summary.skipped_by_reason["identical repeat"]``;
- **conflicts** otherwise: quarantined with a reason that names the file of the
  occurrence kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.fhir.reader import (
    FILE_COLUMN,
    SOURCE_ID_COLUMN,
    FhirReader,
    collector_paused,
    origin_name,
)
from pipelines.fhir.resources import KIND_RESOURCE, SOURCE
from pipelines.identifiers import merge_identifiers
from pipelines.schemas import QUARANTINE, ROW_ORDER, TABLES
from pipelines.sources import IngestSummary, SourceTables

T = TypeVar("T")

#: Record tables: id column and FHIR resource type (None: events, from their kind).
ID_COLUMNS: dict[str, tuple[str, str | None]] = {
    "patients": ("patient_id", "Patient"),
    "encounters": ("encounter_id", "Encounter"),
    "notes": ("note_id", "DocumentReference"),
    "events": ("event_id", None),
}
#: Internal columns of the later occurrences of an id: whether it repeats the first
#: occurrence exactly, and the origin of the first occurrence.
REPEAT_COLUMN, FIRST_COLUMN = "_repeat", "_first"
REPEAT_REASON = "identical repeat"
#: Bundles per chunk of a reader process (~3 MB each as Synthea writes them).
CHUNK_FILES = 16
#: Units read between two conversions of rows into frames (memory against speed).
FLUSH_FILES = 4
#: The record tables' row order (`schemas.ROW_ORDER`).
SORT_KEYS: dict[str, list[str]] = {
    name: ROW_ORDER[name] for name in ("patients", "encounters", "events", "notes", "quarantine")
}
SHARED_PART = "shared.part"
_NOT_CONTENT = ("source_file", "recorded_time")


def content_hashes(name: str, df: pd.DataFrame) -> np.ndarray:
    """A 64-bit hash of each row's canonical content (not the file it came from).

    The values are hashed in their canonical types, so a column that a chunk
    holds as objects (all missing) hashes as it does where it holds numbers.
    """
    if not len(df):
        return np.zeros(0, dtype=np.uint64)
    schema = pa.schema(
        # not the file it came from, nor what is derived from its encounter
        [f for f in TABLES[name] if f.name not in _NOT_CONTENT and f.name in df.columns]
    )
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    return pd.util.hash_pandas_object(table.to_pandas(), index=False).to_numpy()


def later_occurrences(
    name: str, df: pd.DataFrame, hashes: np.ndarray
) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Which rows repeat an id of an earlier row; for every row, whether it equals the
    first row of its id (``hashes``: `content_hashes`), and that first row's origin."""
    key = ID_COLUMNS[name][0]
    later = df[key].duplicated(keep="first")
    if not later.any():
        return later, np.zeros(len(df), dtype=bool), np.zeros(len(df), dtype=np.int64)
    by_id = df[key].to_numpy()
    first_hash = pd.Series(hashes).groupby(by_id, sort=False).transform("first").to_numpy()
    first = df[FILE_COLUMN].groupby(by_id, sort=False).transform("first").to_numpy()
    return later, hashes == first_hash, first


def resolve_duplicates(
    name: str, rows: pd.DataFrame, names: list[str], summary: IngestSummary
) -> list[dict[str, Any]]:
    """Count the later occurrences ``rows`` of table ``name`` (with REPEAT and FIRST
    columns) as repeats or conflicts; returns the quarantine rows of the conflicts.

    The rows of one resource (an Observation's components) are one repeat or one
    conflict: a repeat when every row repeats.
    """
    key, rtype = ID_COLUMNS[name]
    ids = rows[SOURCE_ID_COLUMN] if name == "patients" else rows[key].str.split("#").str[0]
    found = pd.DataFrame(
        {
            "id": ids.to_numpy(dtype=object),
            "file": rows[FILE_COLUMN].to_numpy(),
            "type": rows["kind"].map(KIND_RESOURCE).to_numpy(dtype=object)
            if rtype is None
            else rtype,
            "repeat": rows[REPEAT_COLUMN].to_numpy(dtype=bool),
            "first": rows[FIRST_COLUMN].to_numpy(),
        }
    )
    grouped = found.groupby(["id", "file"], sort=False).agg(
        type=("type", "first"), repeat=("repeat", "all"), first=("first", "first")
    )
    out = []
    for (rid, number), etype, repeat, first in zip(
        grouped.index, grouped["type"], grouped["repeat"], grouped["first"], strict=True
    ):
        summary.kept_by_type[etype] -= 1
        summary.kept -= 1
        if repeat:
            summary.skipped_by_reason[REPEAT_REASON] += 1
            continue
        summary.quarantined += 1
        out.append(
            {
                "source": SOURCE,
                "source_file": origin_name(int(number), names),
                "resource_type": etype,
                "resource_id": rid,
                "reason": f"conflicting duplicate {etype} id: differs from the occurrence "
                f"kept, read from '{origin_name(int(first), names)}'",
            }
        )
    return out


def dedupe(t: SourceTables, names: list[str]) -> SourceTables:
    """Keep the first occurrence (in row order) of every id: ``t``'s tables are replaced
    (not changed), repeats counted and conflicts quarantined in its summary."""
    extra: list[dict[str, Any]] = []
    for name in ID_COLUMNS:
        df: pd.DataFrame = getattr(t, name)
        later, repeat, first = later_occurrences(name, df, content_hashes(name, df))
        if later.any():
            rows = df[later].assign(
                **{REPEAT_COLUMN: repeat[later.to_numpy()], FIRST_COLUMN: first[later.to_numpy()]}
            )
            extra.extend(resolve_duplicates(name, rows, names, t.summary))
            setattr(t, name, df[~later].reset_index(drop=True))
    if extra:
        t.quarantine = pd.concat(
            [t.quarantine, pd.DataFrame(extra, columns=QUARANTINE.names)], ignore_index=True
        )
    return t


def read_chunk(
    paths: list[Path], salt: str | None, names: list[str], first_file: int = 0
) -> SourceTables:
    """Read ``paths`` with one reader: bundle files (input files ``first_file``,
    ``first_file + 1``, …) or parts of a Bulk Data export (``*.part``).

    The record tables carry ``FILE_COLUMN`` (and patients ``SOURCE_ID_COLUMN``);
    repeated ids are kept, in input order, for the caller to resolve over the
    whole input (`dedupe`): resolving them per chunk would depend on the chunks.
    """
    reader = FhirReader(salt, names)
    # the collector paused until the resources and the reader are gone (`collector_paused`)
    with collector_paused():
        for i, path in enumerate(paths):
            if path.suffix == ".part":
                shared = path.parent / SHARED_PART
                if shared.exists() and not reader.shared_medications:
                    reader.load_shared(shared)
                reader.read_part(path)
            else:
                reader.read_bundle(path, first_file + i)
            if (i + 1) % FLUSH_FILES == 0:
                reader.flush()  # dict rows cost ~10× the memory of a frame
        tables = reader.tables()
        del reader
    return tables


def file_chunks(files: list[Path], size: int | None = None) -> list[tuple[int, list[Path]]]:
    """Contiguous chunks of ``files`` as (number of the first file, paths)."""
    size = size or CHUNK_FILES
    return [(i, files[i : i + size]) for i in range(0, len(files), size)]


def pool_size(workers: int | None) -> int:
    """The number of reader processes: ``workers``, by default the number of CPUs."""
    return workers or os.cpu_count() or 1


@contextmanager
def worker_pool(workers: int | None) -> Iterator[Executor | None]:
    """A pool of ``workers`` processes (None for one), started at its first task, so
    that a Bulk Data export's partition pass and its reading share its processes."""
    if pool_size(workers) <= 1:
        yield None
        return
    with ProcessPoolExecutor(
        max_workers=pool_size(workers), mp_context=get_context("spawn")
    ) as pool:
        yield pool


def map_chunks(
    fn: Callable[..., T],
    chunks: list[tuple[int, list[Path]]],
    *args: Any,
    workers: int | None,
    progress: Callable[[int, int], None] | None = None,
    pool: Executor | None = None,
) -> list[T]:
    """``fn(paths, *args, first_file)`` for every chunk, in order, in ``workers`` processes
    (those of ``pool`` when given: `worker_pool`).

    Chunks are small and handed out one at a time, so a worker holds one chunk's
    tables at a time (memory). With one worker or one chunk, runs here.
    ``progress(files_done, files)`` is called as each chunk's result comes back.
    """
    workers = min(pool_size(workers), len(chunks))
    total = sum(len(paths) for _, paths in chunks)
    results: list[T] = []
    done = 0

    def collect(result: T, files: int) -> None:
        nonlocal done
        results.append(result)
        done += files
        if progress is not None:
            progress(done, total)

    if workers <= 1:
        for first, paths in chunks:
            collect(fn(paths, *args, first), len(paths))
        return results
    columns = list(zip(*[(paths, *args, first) for first, paths in chunks], strict=True))
    if pool is not None:
        for (_, paths), result in zip(chunks, pool.map(fn, *columns), strict=True):
            collect(result, len(paths))
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as own:
        for (_, paths), result in zip(chunks, own.map(fn, *columns), strict=True):
            collect(result, len(paths))
    return results


def merge_summaries(summaries: list[IngestSummary]) -> IngestSummary:
    summary = IngestSummary(source=SOURCE)
    for part in summaries:
        summary.add(part)
    return summary


def sorted_tables(t: SourceTables) -> SourceTables:
    """Events' ``recorded_time``, and the canonical row order (by patient and time),
    so that reruns give identical files. Every source reader ends with this.

    ``t`` is updated in place and returned: each table is replaced by its sorted
    copy one at a time, so at most one extra copy is alive (memory).
    """
    events = t.events
    recorded = events["time"].astype("datetime64[us, UTC]")
    if len(events):
        start_of = dict(zip(t.encounters["encounter_id"], t.encounters["start"], strict=True))
        starts = pd.to_datetime(events["encounter_id"].map(start_of), utc=True).astype(
            "datetime64[us, UTC]"
        )
        recorded = recorded.where(starts.isna() | (recorded >= starts), starts)
    events["recorded_time"] = recorded
    del events, recorded
    for name in SORT_KEYS:
        df: pd.DataFrame = getattr(t, name)
        setattr(t, name, None)
        df = df.sort_values(SORT_KEYS[name], kind="stable", na_position="first")
        setattr(t, name, df.reset_index(drop=True))
    return t


def merge_chunks(
    parts: list[SourceTables], names: list[str], before: SourceTables | None = None
) -> SourceTables:
    """The chunks' tables as one, ids repeated across chunks resolved, sorted.

    ``before``: counts and quarantine rows of the input as a whole (files refused,
    lines of an export that could not be read), added first.
    """
    summary = merge_summaries(([before.summary] if before else []) + [p.summary for p in parts])
    merged = {}
    for name in ("patients", "encounters", "events", "notes", "quarantine"):
        frames = [getattr(p, name) for p in parts]
        if before is not None and name == "quarantine":
            frames.insert(0, before.quarantine)
        merged[name] = pd.concat(frames, ignore_index=True)
        for p in parts:  # free each chunk's copy as soon as it is merged
            setattr(p, name, None)
    identifiers: dict[str, dict[str, list[str]]] = {}
    for p in parts:
        merge_identifiers(identifiers, p.identifiers)
    tables = dedupe(SourceTables(summary=summary, identifiers=identifiers, **merged), names)
    for name in ID_COLUMNS:  # patients keep SOURCE_ID_COLUMN for the crosswalk
        setattr(tables, name, getattr(tables, name).drop(columns=[FILE_COLUMN]))
    del merged, parts
    return sorted_tables(tables)
