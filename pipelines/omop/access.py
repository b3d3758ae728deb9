"""Where OMOP CDM tables are read from: a DuckDB file, a folder of CSV files, or a
database behind a SQLAlchemy URL (PostgreSQL first), and how, without injection.

Only the CDM tables PMLM reads are ever named in SQL, and only the columns it
needs: a file or table whose name is not one of them is never put in a
query. Table and column names are quoted by the database's own rules; file
paths and values are bound parameters. Rows come in chunks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pandas as pd

from pipelines.sources import IngestError

#: Rows per chunk read from a table.
CHUNK_ROWS = 100_000
_URL = re.compile(r"^[a-z][a-z0-9+]*://")


class OmopInputError(IngestError):
    """The OMOP input cannot be opened; the message says what to give instead."""


def is_url(where: str | Path) -> bool:
    return bool(_URL.match(str(where)))


def quote(name: str) -> str:
    """A SQL identifier in double quotes (a quote inside is doubled)."""
    return '"' + name.replace('"', '""') + '"'


class TableAccess(Protocol):
    """The tables of one CDM: lower-case name → where it came from."""

    origins: dict[str, str]

    def columns(self, table: str) -> set[str]: ...
    def read(self, table: str, columns: Sequence[str]) -> Iterator[pd.DataFrame]: ...
    def lookup(
        self, table: str, key: str, values: Sequence[int], columns: Sequence[str]
    ) -> pd.DataFrame: ...
    def close(self) -> None: ...


def _chunks(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> Iterator[pd.DataFrame]:
    result = con.execute(sql, params)
    while True:
        chunk = result.fetch_df_chunk(max(1, CHUNK_ROWS // 2048))  # in vectors of 2,048 rows
        if chunk.empty:
            return
        yield chunk


class DuckDbAccess:
    """A DuckDB file (attached read-only) or a folder of ``TABLE.csv`` files."""

    def __init__(self, path: Path, wanted: frozenset[str]) -> None:
        self.con = duckdb.connect(":memory:")
        self.origins: dict[str, str] = {}
        self.ignored: list[str] = []
        # table → (FROM clause, its parameters)
        self.sources: dict[str, tuple[str, list[Any]]] = {}
        self._columns: dict[str, dict[str, str]] = {}
        if path.is_dir():
            csvs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".csv")
            if not csvs:
                raise OmopInputError(f"{path} holds no CDM *.csv files (person.csv, ...)")
            for csv in csvs:
                name = csv.stem.lower()
                if name not in wanted:
                    self.ignored.append(csv.name)
                    continue
                self.sources[name] = ("read_csv(?, header=true, all_varchar=true)", [str(csv)])
                self.origins[name] = str(csv)
        else:
            try:
                self.con.execute("ATTACH ? AS cdm (READ_ONLY)", [str(path)])
                names = self.con.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'cdm'"
                ).fetchall()
            except duckdb.Error as exc:
                raise OmopInputError(
                    f"{path} is not a DuckDB database ({str(exc).splitlines()[0]}): give an "
                    "OMOP CDM DuckDB file, a folder of CDM CSV files or a database URL"
                ) from None
            for (name,) in names:
                if name.lower() not in wanted:
                    self.ignored.append(name)
                    continue
                self.sources[name.lower()] = (f"cdm.{quote(name)}", [])
                self.origins[name.lower()] = f"{path}:{name}"

    def columns(self, table: str) -> set[str]:
        if table not in self._columns:
            clause, params = self.sources[table]
            rel = self.con.execute(f"SELECT * FROM {clause} LIMIT 0", params)
            self._columns[table] = {d[0].lower(): d[0] for d in rel.description or []}
        return set(self._columns[table])

    def _select(self, table: str, columns: Sequence[str]) -> str:
        self.columns(table)
        actual = self._columns[table]
        return ", ".join(f"{quote(actual[c])} AS {quote(c)}" for c in columns)

    def read(self, table: str, columns: Sequence[str]) -> Iterator[pd.DataFrame]:
        clause, params = self.sources[table]
        return _chunks(self.con, f"SELECT {self._select(table, columns)} FROM {clause}", params)

    def lookup(
        self, table: str, key: str, values: Sequence[int], columns: Sequence[str]
    ) -> pd.DataFrame:
        clause, params = self.sources[table]
        self.con.register("pmlm_keys", pd.DataFrame({"k": pd.Series(values, dtype="int64")}))
        actual = self._columns[table][key]
        sql = (
            f"SELECT {self._select(table, columns)} FROM {clause} "
            f"WHERE TRY_CAST({quote(actual)} AS BIGINT) IN (SELECT k FROM pmlm_keys)"
        )
        frames = list(_chunks(self.con, sql, params))
        self.con.unregister("pmlm_keys")
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    def close(self) -> None:
        self.con.close()


class SqlAccess:
    """A database behind a SQLAlchemy URL; ``schema``: the CDM's schema (``--cdm-schema``)."""

    def __init__(self, url: str, schema: str | None, wanted: frozenset[str]) -> None:
        import sqlalchemy as sa

        self.sa = sa
        try:
            self.engine = sa.create_engine(url)
            inspector = sa.inspect(self.engine)
            names = inspector.get_table_names(schema=schema)
        except (sa.exc.SQLAlchemyError, ModuleNotFoundError) as exc:
            shown = self._safe(url)
            raise OmopInputError(
                f"cannot read the database {shown} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}): check the URL, the server and --cdm-schema"
            ) from None
        if not names:
            raise OmopInputError(
                f"the database {self._safe(url)} has no tables in schema "
                f"{schema or '(default)'}: give the CDM's schema with --cdm-schema"
            )
        self.schema = schema
        self.origins: dict[str, str] = {}
        self.ignored: list[str] = []
        self.actual: dict[str, str] = {}
        self._columns: dict[str, dict[str, str]] = {}
        for name in names:
            if name.lower() not in wanted:
                self.ignored.append(name)
                continue
            self.actual[name.lower()] = name
            self.origins[name.lower()] = f"{self._safe(url)}:{schema + '.' if schema else ''}{name}"
        self.inspector = inspector

    @staticmethod
    def _safe(url: str) -> str:
        """The URL without its password."""
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)

    def columns(self, table: str) -> set[str]:
        if table not in self._columns:
            cols = self.inspector.get_columns(self.actual[table], schema=self.schema)
            self._columns[table] = {c["name"].lower(): c["name"] for c in cols}
        return set(self._columns[table])

    def _from(self, table: str) -> tuple[str, Any]:
        preparer = self.engine.dialect.identifier_preparer
        name = preparer.quote(self.actual[table])
        if self.schema:
            name = f"{preparer.quote_schema(self.schema)}.{name}"
        self.columns(table)
        return name, preparer

    def _select(self, table: str, columns: Sequence[str]) -> str:
        _, preparer = self._from(table)
        actual = self._columns[table]
        return ", ".join(f"{preparer.quote(actual[c])} AS {preparer.quote(c)}" for c in columns)

    def read(self, table: str, columns: Sequence[str]) -> Iterator[pd.DataFrame]:
        name, _ = self._from(table)
        sql = self.sa.text(f"SELECT {self._select(table, columns)} FROM {name}")
        with self.engine.connect() as con:
            yield from pd.read_sql(sql, con, chunksize=CHUNK_ROWS)

    def lookup(
        self, table: str, key: str, values: Sequence[int], columns: Sequence[str]
    ) -> pd.DataFrame:
        name, preparer = self._from(table)
        col = preparer.quote(self._columns[table][key])
        frames = []
        with self.engine.connect() as con:
            for i in range(0, len(values), 1000):
                batch = [int(v) for v in values[i : i + 1000]]
                sql = self.sa.text(
                    f"SELECT {self._select(table, columns)} FROM {name} WHERE {col} IN :keys"
                ).bindparams(self.sa.bindparam("keys", expanding=True))
                frames.append(pd.read_sql(sql, con, params={"keys": batch}))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    def close(self) -> None:
        self.engine.dispose()


def open_cdm(where: str | Path, wanted: frozenset[str], schema: str | None = None) -> TableAccess:
    """The tables of a CDM at ``where``: a SQLAlchemy URL, a DuckDB file or a CSV folder."""
    if is_url(where):
        return SqlAccess(str(where), schema, wanted)
    path = Path(where)
    if not path.exists():
        raise OmopInputError(
            f"{path} does not exist: give an OMOP CDM DuckDB file, a folder of CDM CSV "
            "files, or a database URL (postgresql://...)"
        )
    if schema:
        raise OmopInputError("--cdm-schema is for a database URL, not a file or folder")
    return DuckDbAccess(path, wanted)
