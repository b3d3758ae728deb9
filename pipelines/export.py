"""Export of a table (the prompt table) for downstream apps: parquet, JSONL and an SQL table.

``export_table`` writes one arrow table in up to three forms and a manifest::

    OUT_DIR/
      NAME.parquet           the table, with its arrow schema
      NAME.jsonl             one JSON object per row; timestamps as ISO-8601 in UTC
      NAME.sqlite            default SQL target (any SQLAlchemy URL may be given instead)
      NAME.manifest.json     schema version, columns and types, rows, sha256 of each file,
                             created_at, and the caller's fields (input data hash, versions)

Readers never see half an export of one form: the files are written to
temporary files in the same folder, flushed to disk, and renamed over the old
ones; the SQL table is filled and swapped in one transaction. The order is:
stage the files → SQL transaction → rename the files → manifest. A failure
before the renames leaves the previous export untouched (no temporary file
stays behind); the manifest is written last, so its checksums describe the
files once it appears.

This module reads only the table it is given (``table.schema`` is the
contract): it knows nothing of prompts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipelines.errors import ConfigError, InputError, PMLMError
from pipelines.workspace import (
    MissingTableError,
    Workspace,
    atomic_write_bytes,
    publish_file,
    transactional,
)

#: Version of the manifest's layout and of the export forms; bumped when either changes.
EXPORT_SCHEMA_VERSION = "1"
FORMATS = ("parquet", "jsonl", "sql")
#: Rows per INSERT batch of the SQL export.
SQL_BATCH_ROWS = 1000
#: Rows converted to Python objects at a time for the JSONL export.
JSONL_CHUNK_ROWS = 10_000
#: Keys the manifest sets itself; a caller's field may not replace them.
RESERVED_MANIFEST_KEYS = (
    "schema_version",
    "name",
    "created_at",
    "rows",
    "columns",
    "formats",
    "files",
    "sql",
)
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ExportFailed(PMLMError, RuntimeError):
    """The SQL target refused the export; it was rolled back and the previous export is unchanged."""

    exit_code = 10


@dataclass(frozen=True)
class ExportResult:
    """Where an export went.

    ``files`` maps a format to the file written (absolute path) or, for ``sql``,
    to ``URL#TABLE`` (the URL without its password).
    """

    out_dir: Path
    files: dict[str, str]
    manifest_path: Path
    rows: int


def redact_url(url: str) -> str:
    """``url`` with the password replaced by ``***`` (also for strings SQLAlchemy cannot parse)."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def sql_engine(url: str) -> Engine:
    """An engine for ``url`` whose transactions include DDL (CREATE, DROP, ALTER).

    Python's sqlite3 driver, in its default (legacy) mode, sends no BEGIN before
    DDL: each CREATE or DROP would commit on its own and a reader could see the
    table missing or half filled. For SQLite the engine therefore emits BEGIN
    itself (the recipe of SQLAlchemy's SQLite dialect documentation).

    Raises ValueError naming the URL (without password) when SQLAlchemy cannot use it.
    """
    shown = redact_url(url)
    try:
        engine = sa.create_engine(sa.make_url(url))
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise ConfigError(
            f"cannot use the SQL URL {shown!r}: {exc}. Give an SQLAlchemy URL such as "
            "sqlite:///path/prompts.sqlite or postgresql+psycopg://user@host/db, "
            "with its database driver installed"
        ) from exc
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock at once: no late lock upgrade to fail
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def sql_type(field: pa.Field) -> sa.types.TypeEngine[Any]:
    """The SQL column type of an arrow field (ValueError for types an SQL column cannot hold)."""
    t = field.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return sa.Text()
    if pa.types.is_boolean(t):
        return sa.Boolean()
    if pa.types.is_integer(t):
        small = t.bit_width <= 32 and not (pa.types.is_unsigned_integer(t) and t.bit_width == 32)
        return sa.Integer() if small else sa.BigInteger()
    if pa.types.is_floating(t):
        return sa.Double()
    if pa.types.is_timestamp(t):
        return sa.DateTime(timezone=t.tz is not None)
    if pa.types.is_date(t):
        return sa.Date()
    raise ValueError(
        f"column {field.name!r} has arrow type {t}, which the SQL export does not support "
        "(strings, booleans, integers, floats, timestamps and dates are): "
        "export it without 'sql' or convert the column (e.g. to a JSON string)"
    )


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
        return value.isoformat(timespec="microseconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(
        f"cannot write a {type(value).__name__} value to JSONL: convert its column to a "
        "string, number, boolean, timestamp or date first"
    )


def _jsonl_lines(table: pa.Table) -> Iterator[bytes]:
    for batch in table.to_batches(max_chunksize=JSONL_CHUNK_ROWS):
        for row in batch.to_pylist():
            # JSON has no NaN or infinity
            clean = {
                k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in row.items()
            }
            line = json.dumps(clean, ensure_ascii=False, default=_json_value, allow_nan=False)
            yield line.encode() + b"\n"


def write_jsonl(table: pa.Table, handle: IO[bytes]) -> None:
    """One JSON object per row: timestamps ISO-8601 in UTC, non-finite floats as null."""
    for line in _jsonl_lines(table):
        handle.write(line)


def write_parquet(table: pa.Table, handle: IO[bytes]) -> None:
    pq.write_table(table, handle, compression="zstd")


FILE_WRITERS: dict[str, tuple[str, Callable[[pa.Table, IO[bytes]], None]]] = {
    "parquet": ("parquet", write_parquet),
    "jsonl": ("jsonl", write_jsonl),
}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path``, removed on failure (the caller renames it on success)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.unlink(missing_ok=True)  # left unpublished by the caller


def _stage_file(table: pa.Table, tmp: Path, writer: Callable[[pa.Table, IO[bytes]], None]) -> None:
    with tmp.open("xb") as handle:
        writer(table, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _sql_rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    rows = batch.to_pylist()
    for row in rows:
        for key, value in row.items():
            if isinstance(value, dt.datetime) and value.tzinfo is not None:
                row[key] = value.astimezone(dt.UTC)
    return rows


def insert_batch(conn: Connection, target: sa.Table, batch: pa.RecordBatch) -> None:
    """INSERT one batch of rows (one executemany)."""
    conn.execute(sa.insert(target), _sql_rows(batch))


def write_sql(engine: Engine, table: pa.Table, name: str) -> None:
    """Replace SQL table ``name`` by ``table`` in one transaction.

    The rows go into ``NAME__new``, then the old table is dropped and the new one
    renamed, all before COMMIT: a reader sees the old table or the new one. (On
    databases whose DDL commits implicitly, such as MySQL, the swap is not atomic.)
    """
    staging = f"{name}__new"
    metadata = sa.MetaData()
    target = sa.Table(
        staging,
        metadata,
        *(sa.Column(f.name, sql_type(f), nullable=f.nullable) for f in table.schema),
    )
    with engine.begin() as conn:
        sa.Table(staging, sa.MetaData()).drop(conn, checkfirst=True)  # an earlier crash's leftover
        target.create(conn)
        for batch in table.to_batches(max_chunksize=SQL_BATCH_ROWS):
            if batch.num_rows:
                insert_batch(conn, target, batch)
        sa.Table(name, sa.MetaData()).drop(conn, checkfirst=True)
        preparer = conn.dialect.identifier_preparer
        conn.exec_driver_sql(
            f"ALTER TABLE {preparer.quote(staging)} RENAME TO {preparer.quote(name)}"
        )


def _columns(schema: pa.Schema) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


@transactional("export", folder="out_dir")  # the files and the manifest publish together
def export_table(
    table: pa.Table,
    out_dir: Path,
    *,
    name: str = "prompts",
    formats: Sequence[str] = FORMATS,
    sql_url: str | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write ``table`` to ``out_dir`` in ``formats`` and then ``NAME.manifest.json``.

    Args:
        table: any arrow table; its schema is recorded in the manifest.
        out_dir: folder of the files (created).
        name: file stem and SQL table name (letters, digits, underscores).
        formats: any of ``parquet``, ``jsonl``, ``sql``.
        sql_url: SQLAlchemy URL of the SQL target (default ``sqlite:///OUT_DIR/NAME.sqlite``).
        manifest: extra manifest fields (input data hash, recommender, policy, LLM).

    Returns the files written, the manifest path and the row count. Raises
    ValueError for an unknown format, a bad name, a manifest field that would
    replace one of the export's own, a column type the SQL export cannot hold,
    or an SQL URL that SQLAlchemy cannot use (all before anything is written);
    RuntimeError when the database cannot be reached or written (the previous
    export is then unchanged).

    Example::

        result = export_table(pq.read_table("ws/tables/prompts.parquet"), Path("ws/export"))
        json.loads(result.manifest_path.read_text())["files"]["parquet"]["sha256"]
    """
    chosen = [formats] if isinstance(formats, str) else list(dict.fromkeys(formats))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise InputError(f"unknown export format(s) {unknown}; choose from {', '.join(FORMATS)}")
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"export name {name!r} must be letters, digits and underscores (it names files and an SQL table)"
        )
    extra = dict(manifest or {})
    clashes = sorted(set(extra) & set(RESERVED_MANIFEST_KEYS))
    if clashes:
        raise ValueError(f"manifest field(s) {clashes} are set by the export itself; rename them")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine: Engine | None = None
    url = ""
    if "sql" in chosen:
        url = sql_url or f"sqlite:///{(out_dir / f'{name}.sqlite').resolve()}"
        engine = sql_engine(url)
        for field in table.schema:
            sql_type(field)  # an unsupported column fails before anything is written

    finals = {fmt: out_dir / f"{name}.{FILE_WRITERS[fmt][0]}" for fmt in chosen if fmt != "sql"}
    entries: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        staged = {fmt: stack.enter_context(_staged(path)) for fmt, path in finals.items()}
        for fmt, tmp in staged.items():
            _stage_file(table, tmp, FILE_WRITERS[fmt][1])
            entries[fmt] = {
                "path": finals[fmt].name,
                "sha256": file_sha256(tmp),
                "bytes": tmp.stat().st_size,
            }
        if engine is not None:
            try:
                write_sql(engine, table, name)
            except sa.exc.OperationalError as exc:
                raise ExportFailed(
                    f"SQL export to {redact_url(url)} (table {name!r}) failed and was rolled back: "
                    f"{exc.orig}. Check that the database is reachable and writable; "
                    "the previous export is unchanged"
                ) from exc
            finally:
                engine.dispose()
        for fmt, tmp in staged.items():
            publish_file(tmp, finals[fmt])
    _fsync_dir(out_dir)

    files = {fmt: str(path.resolve()) for fmt, path in finals.items()}
    if engine is not None:
        files["sql"] = f"{redact_url(url)}#{name}"
    document: dict[str, Any] = {
        "schema_version": EXPORT_SCHEMA_VERSION,
        "name": name,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rows": table.num_rows,
        "columns": _columns(table.schema),
        "formats": chosen,
        "files": entries,
        "sql": {"url": redact_url(url), "table": name} if engine is not None else None,
        **extra,
    }
    manifest_path = out_dir / f"{name}.manifest.json"
    atomic_write_bytes(manifest_path, json.dumps(document, indent=2, default=str).encode())
    return ExportResult(out_dir, files, manifest_path, table.num_rows)


def dataset_fingerprint(workspace: Workspace, tables: Sequence[str]) -> str:
    """SHA-256 (hex) of the named table files of ``workspace``, in sorted name order.

    Each table contributes its name, its size and its bytes, so renaming or
    moving bytes between tables changes the hash. Raises MissingTableError
    (naming the file and the command to run) when a table is absent.
    """
    digest = hashlib.sha256()
    for name in sorted(set(tables)):
        path = workspace.table_path(name)
        if not path.exists():
            raise MissingTableError(
                f"{path} does not exist: run `pmlm ingest ...` (or `pmlm run`) "
                f"with --workspace {workspace.root} first"
            )
        digest.update(name.encode() + b"\0" + path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "EXPORT_SCHEMA_VERSION",
    "FORMATS",
    "ExportResult",
    "dataset_fingerprint",
    "export_table",
    "redact_url",
    "sql_engine",
    "sql_type",
    "write_jsonl",
    "write_sql",
]
