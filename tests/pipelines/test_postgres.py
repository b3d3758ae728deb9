"""OMOP in a real PostgreSQL server (Eunomia loaded into it) and the SQL export to it."""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pytest
import sqlalchemy as sa

from pipelines.export import write_sql
from pipelines.omop import eunomia_path, read_omop
from pipelines.omop.tables import TABLE_READERS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eunomia_url(postgres_url: str) -> str:
    """Eunomia's CDM tables (those PMLM reads) in schema ``cdm`` of a new database."""
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as con:
        con.exec_driver_sql("DROP DATABASE IF EXISTS eunomia")
        con.exec_driver_sql("CREATE DATABASE eunomia")
    admin.dispose()
    url = postgres_url.replace("/postgres?", "/eunomia?")
    engine = sa.create_engine(url)
    source = duckdb.connect(":memory:")
    source.execute("ATTACH ? AS e (READ_ONLY)", [str(eunomia_path())])
    names = [
        n
        for (n,) in source.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'e'"
        ).fetchall()
        if n.lower() in {*TABLE_READERS, "concept"}
    ]
    with engine.begin() as con:
        con.exec_driver_sql("CREATE SCHEMA cdm")
    for name in names:
        frame = source.execute(f'SELECT * FROM e."{name}"').df()
        frame.to_sql(name, engine, schema="cdm", index=False, chunksize=20_000)
    engine.dispose()
    return url


def test_eunomia_in_postgresql_gives_the_tables_of_the_duckdb_file(eunomia_url: str) -> None:
    """Acceptance: the same tables from the server as from the DuckDB file."""
    want = read_omop(eunomia_path())
    got = read_omop(eunomia_url, cdm_schema="cdm")
    assert got.summary.reconciles()
    assert got.summary.kept_by_type == want.summary.kept_by_type
    for name in ("encounters", "events", "notes"):
        pd.testing.assert_frame_equal(getattr(got, name), getattr(want, name), obj=name)
    pd.testing.assert_frame_equal(
        got.patients.drop(columns=["source_file"]), want.patients.drop(columns=["source_file"])
    )
    assert got.patients["source_file"].str.startswith("postgresql+psycopg://postgres@").all()
    assert len(got.patients) == 2694


def test_a_wrong_schema_is_a_one_line_error(eunomia_url: str) -> None:
    from pipelines.omop import OmopInputError

    with pytest.raises(OmopInputError, match="no tables in schema nowhere: give the CDM's schema"):
        read_omop(eunomia_url, cdm_schema="nowhere")


def test_a_polling_reader_never_sees_a_partial_export(postgres_url: str, tmp_path: Path) -> None:
    """`write_sql` swaps the table in one transaction: a reader that polls the table
    while it is exported again sees the old rows or the new ones, never a part, and
    no error."""
    engine = sa.create_engine(postgres_url)
    old = pa.table({"k": pa.array(range(3000), pa.int64()), "v": ["old"] * 3000})
    new = pa.table({"k": pa.array(range(5000), pa.int64()), "v": ["new"] * 5000})
    write_sql(engine, old, "prompts")
    seen: list[tuple[int, int]] = []
    errors: list[str] = []
    done = threading.Event()

    def poll() -> None:
        reader = sa.create_engine(postgres_url)
        while not done.is_set():
            try:
                with reader.connect() as con:
                    row = con.exec_driver_sql(
                        "SELECT count(*), count(DISTINCT v) FROM prompts"
                    ).one()
                seen.append((int(row[0]), int(row[1])))
            except sa.exc.DBAPIError as exc:
                errors.append(str(exc).splitlines()[0])
        reader.dispose()

    thread = threading.Thread(target=poll)
    thread.start()
    for table in (new, old, new):
        write_sql(engine, table, "prompts")
    done.set()
    thread.join()
    engine.dispose()
    assert not errors, errors[:3]
    assert len(seen) > 3
    assert set(seen) <= {(3000, 1), (5000, 1)}
