"""Export of the prompt table: round trips, the manifest, atomicity, and the app example of the docs."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

import pipelines.export as export
from pipelines.export import (
    EXPORT_SCHEMA_VERSION,
    dataset_fingerprint,
    export_table,
    sql_engine,
    write_jsonl,
)
from pipelines.lock import LOCK_FILE
from pipelines.workspace import MissingTableError, Workspace
from promptenv.prompt_table import PROMPTS_SCHEMA

DOC = Path(__file__).resolve().parents[2] / "docs" / "prompt-table.md"
T0 = dt.datetime(2024, 3, 1, 9, 30, tzinfo=dt.UTC)


def prompt_table(n: int, seed: int = 0) -> pa.Table:
    """A prompt table of ``n`` rows (several per patient), seeded, in the real schema."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        provenance = {
            "fragments": [
                {"name": "profile", "event_ids": [f"e{i}"], "age_years": int(rng.integers(18, 46))},
                {"name": "self", "model": "als", "items": [{"item_key": "loinc|1", "score": 0.5}]},
            ]
        }
        rows.append(
            {
                "encounter_id": f"enc-{seed}-{i}",
                "patient_id": f"p{i % 7:016x}",
                "index_time": T0 + dt.timedelta(days=int(rng.integers(0, 900)), microseconds=i),
                "method": ("pmlm_initial", "general", "self")[i % 3],
                "config": json.dumps({"k_self": int(rng.integers(1, 9))}),
                "system": f'Patient: {i}-year-old woman.\n- "quoted" × ünïcode\n\n{rng.random():.6f}',
                "question": "What should be planned at this patient's next visit?",
                "tokens": int(rng.integers(0, 400)),
                "provenance": json.dumps(provenance),
                "recommender": "als",
                "created_at": T0 + dt.timedelta(seconds=seed),
            }
        )
    return pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA)


def other_types_table(seed: int = 0) -> pa.Table:
    """Column types beyond the prompt table's: floats with nulls, booleans, int64, dates, naive times."""
    rng = np.random.default_rng(seed)
    n = 12
    return pa.table(
        {
            "x": pa.array([float(v) if v > 0.2 else None for v in rng.random(n)], pa.float64()),
            "flag": pa.array([bool(v) for v in rng.integers(0, 2, n)], pa.bool_()),
            "big": pa.array([int(v) * 10**12 for v in rng.integers(-5, 5, n)], pa.int64()),
            "day": pa.array([dt.date(2020, 1, 1) + dt.timedelta(days=int(d)) for d in range(n)]),
            "naive": pa.array(
                [dt.datetime(2021, 5, 1) + dt.timedelta(hours=int(h)) for h in range(n)],
                pa.timestamp("us"),
            ),
            "label": pa.array([None if i % 5 == 0 else f"r{i}" for i in range(n)], pa.string()),
        }
    )


def read_sql(url: str, name: str, schema: pa.Schema) -> pa.Table:
    engine = sa.create_engine(url)
    try:
        target = sa.Table(name, sa.MetaData(), autoload_with=engine)
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(sa.select(target))]
    finally:
        engine.dispose()
    return pa.Table.from_pylist(rows, schema=schema)


def sql_column_types(url: str, name: str) -> dict[str, str]:
    engine = sa.create_engine(url)
    try:
        return {c["name"]: str(c["type"]) for c in sa.inspect(engine).get_columns(name)}
    finally:
        engine.dispose()


def read_jsonl(path: Path, schema: pa.Schema) -> pa.Table:
    """The JSONL export read back with the manifest's types (arrow's JSON reader parses dates as text)."""
    as_read = pa.schema(
        [f.with_type(pa.string()) if pa.types.is_date(f.type) else f for f in schema]
    )
    table = pj.read_json(path, parse_options=pj.ParseOptions(explicit_schema=as_read))
    return table.cast(schema)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def sqlite_tables(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return sorted(
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        )


# ---------------------------------------------------------------- round trips and manifest


@pytest.mark.parametrize("make", [prompt_table, other_types_table], ids=["prompts", "other-types"])
def test_round_trip_in_all_three_formats_equals_the_input(tmp_path: Path, make: Any) -> None:
    table = make(40) if make is prompt_table else make()
    result = export_table(table, tmp_path / "out")
    files = result.files
    assert set(files) == {"parquet", "jsonl", "sql"}
    assert result.rows == table.num_rows

    parquet = pq.read_table(files["parquet"])
    assert parquet.schema.equals(table.schema) and parquet.equals(table)

    jsonl = read_jsonl(Path(files["jsonl"]), table.schema)
    assert jsonl.equals(table)
    lines = Path(files["jsonl"]).read_text().splitlines()
    assert len(lines) == table.num_rows
    assert all(isinstance(json.loads(line), dict) for line in lines)

    url, _, name = files["sql"].rpartition("#")
    assert read_sql(url, name, table.schema).equals(table)
    types = sql_column_types(url, name)
    assert set(types) == set(table.schema.names)
    if make is prompt_table:
        assert types["system"] == "TEXT" and types["tokens"] == "INTEGER"
        assert types["index_time"] == "DATETIME"
    else:
        assert types["big"] == "BIGINT" and types["flag"] == "BOOLEAN"


def test_jsonl_writes_timestamps_as_iso_8601_in_utc() -> None:
    table = pa.table(
        {
            "t": pa.array(
                [dt.datetime(2024, 1, 2, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))],
                pa.timestamp("us", tz="America/New_York"),
            ),
            "x": [float("nan")],
        }
    )
    buffer = io.BytesIO()
    write_jsonl(table, buffer)
    row = json.loads(buffer.getvalue())
    assert row["t"] == "2024-01-03T04:30:00.000000+00:00"
    assert row["x"] is None  # JSON has no NaN


def test_manifest_records_schema_rows_checksums_and_the_callers_fields(tmp_path: Path) -> None:
    table = prompt_table(25, seed=3)
    extra = {"input_data_hash": "abc123", "recommender": {"selected": "als"}, "llm": None}
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    result = export_table(table, tmp_path, manifest=extra)
    assert result.manifest_path == tmp_path / "prompts.manifest.json"
    manifest = json.loads(result.manifest_path.read_text())

    assert manifest["schema_version"] == EXPORT_SCHEMA_VERSION
    assert manifest["rows"] == 25
    assert manifest["formats"] == ["parquet", "jsonl", "sql"]
    assert manifest["columns"] == [
        {"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in PROMPTS_SCHEMA
    ]
    assert manifest["columns"][2]["type"] == "timestamp[us, tz=UTC]"
    created = dt.datetime.fromisoformat(manifest["created_at"])
    assert created.utcoffset() == dt.timedelta(0) and created >= before
    for fmt in ("parquet", "jsonl"):
        entry = manifest["files"][fmt]
        data = (tmp_path / entry["path"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
    assert manifest["sql"] == {
        "url": f"sqlite:///{(tmp_path / 'prompts.sqlite').resolve()}",
        "table": "prompts",
    }
    for key, value in extra.items():
        assert manifest[key] == value
    # the manifest is written last: it is at least as new as every data file
    mtimes = [(tmp_path / f"prompts.{ext}").stat().st_mtime_ns for ext in ("parquet", "jsonl")]
    assert result.manifest_path.stat().st_mtime_ns >= max(mtimes)


def test_only_the_chosen_formats_are_written(tmp_path: Path) -> None:
    result = export_table(prompt_table(5), tmp_path, name="current", formats=["jsonl"])
    assert set(result.files) == {"jsonl"}
    files = sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock")  # the writers' lock
    assert files == ["current.jsonl", "current.manifest.json"]
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["formats"] == ["jsonl"] and manifest["sql"] is None
    one = export_table(prompt_table(5), tmp_path / "one", formats="parquet")  # a str is one format
    assert set(one.files) == {"parquet"}


def test_unknown_format_and_bad_arguments_say_what_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown export format.*'csv'.*parquet, jsonl, sql"):
        export_table(prompt_table(3), tmp_path, formats=["parquet", "csv"])
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        export_table(prompt_table(3), tmp_path, name="prompts; DROP TABLE x")
    with pytest.raises(ValueError, match=r"\['rows'\] are set by the export"):
        export_table(prompt_table(3), tmp_path, manifest={"rows": 1})
    nested = pa.table({"items": pa.array([[1, 2]], pa.list_(pa.int64()))})
    with pytest.raises(ValueError, match=r"column 'items'.*list<item: int64>"):
        export_table(nested, tmp_path, formats=["sql"])
    # nothing is written before the arguments are checked (but the writers' lock file)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


def test_bad_sql_url_names_the_url_without_its_password(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as unknown:
        export_table(prompt_table(3), tmp_path, sql_url="nosuchdb://admin:s3cret@db.example/pmlm")
    message = str(unknown.value)
    assert "nosuchdb://admin:***@db.example/pmlm" in message and "s3cret" not in message
    assert "SQLAlchemy URL" in message

    with pytest.raises(ValueError, match="not-a-url"):
        export_table(prompt_table(3), tmp_path, sql_url="not-a-url")

    missing_dir = tmp_path / "no" / "such" / "folder" / "db.sqlite"
    with pytest.raises(RuntimeError, match=r"sqlite:///.*db\.sqlite.*rolled back.*reachable"):
        export_table(prompt_table(3), tmp_path / "out", sql_url=f"sqlite:///{missing_dir}")
    assert leftovers(tmp_path / "out") == []


def test_any_sqlalchemy_url_and_a_table_name_of_ones_choice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    result = export_table(prompt_table(9), tmp_path / "out", name="current_prompts", sql_url=url)
    assert result.files["sql"] == f"{url}#current_prompts"
    assert read_sql(url, "current_prompts", PROMPTS_SCHEMA).equals(prompt_table(9))
    assert not (tmp_path / "out" / "current_prompts.sqlite").exists()


# ---------------------------------------------------------------- atomicity


def test_sqlite_rolls_back_ddl_only_with_the_exports_engine(tmp_path: Path) -> None:
    """Why `sql_engine` emits BEGIN itself: sqlite3's legacy mode commits a CREATE at once."""
    url = f"sqlite:///{tmp_path / 'ddl.db'}"
    for make, name in ((sa.create_engine, "legacy"), (sql_engine, "export")):
        engine = make(url)
        with pytest.raises(RuntimeError, match="boom"), engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {name} (a INTEGER)")
            raise RuntimeError("boom")
        engine.dispose()
    assert sqlite_tables(tmp_path / "ddl.db") == ["legacy"]


def test_readers_of_the_files_never_see_a_partial_export(tmp_path: Path) -> None:
    versions = [prompt_table(1500, seed=1), prompt_table(2500, seed=2)]
    jsonl_versions = set()
    for table in versions:
        buffer = io.BytesIO()
        write_jsonl(table, buffer)
        jsonl_versions.add(buffer.getvalue())
    formats = ("parquet", "jsonl")
    export_table(versions[0], tmp_path, formats=formats)
    done = threading.Event()
    problems: list[str] = []
    reads = {"parquet": 0, "jsonl": 0}

    def reader() -> None:
        while not done.is_set():
            try:
                # one open file: pyarrow given a path opens it twice (footer, then
                # data) and could pair one export's footer with the next one's data
                with (tmp_path / "prompts.parquet").open("rb") as handle:
                    table = pq.read_table(handle)
                if not any(table.equals(v) for v in versions):
                    problems.append(f"parquet with {table.num_rows} rows is neither version")
                reads["parquet"] += 1
                if (tmp_path / "prompts.jsonl").read_bytes() not in jsonl_versions:
                    problems.append("jsonl is neither version")
                reads["jsonl"] += 1
            except Exception as exc:  # recorded: the test fails on it below
                problems.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(16):
            export_table(versions[(i + 1) % 2], tmp_path, formats=formats)
    finally:
        done.set()
        thread.join()
    assert problems == []
    assert reads["parquet"] >= 5 and reads["jsonl"] >= 5
    assert leftovers(tmp_path) == []


def test_sql_readers_see_the_old_or_the_new_row_count_never_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "SQL_BATCH_ROWS", 40)  # many INSERTs per export
    sizes = (300, 700)
    versions = [prompt_table(n, seed=n) for n in sizes]
    export_table(versions[0], tmp_path, formats=["sql"])
    done = threading.Event()
    seen: list[int] = []
    problems: list[str] = []

    def reader() -> None:
        conn = sqlite3.connect(tmp_path / "prompts.sqlite", timeout=60)
        try:
            while not done.is_set():
                try:
                    seen.append(conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0])
                except sqlite3.Error as exc:  # recorded: the test fails on it below
                    problems.append(str(exc))
        finally:
            conn.close()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(10):
            export_table(versions[(i + 1) % 2], tmp_path, formats=["sql"])
    finally:
        done.set()
        thread.join()
    assert problems == []
    assert len(seen) >= 10
    assert set(seen) <= set(sizes), sorted(set(seen) - set(sizes))
    assert sqlite_tables(tmp_path / "prompts.sqlite") == ["prompts"]


def snapshot(folder: Path) -> dict[str, Any]:
    """Everything a reader of an export can read: file bytes and the SQL rows (not the lock
    file, which names its last holder and when: two exports a second apart differ there)."""
    files = {
        p.name: p.read_bytes()
        for p in folder.iterdir()
        if p.suffix != ".sqlite" and p.name != LOCK_FILE
    }
    rows = read_sql(f"sqlite:///{folder / 'prompts.sqlite'}", "prompts", PROMPTS_SCHEMA)
    return {"files": files, "sql": rows}


def test_export_failing_during_the_sql_insert_leaves_the_previous_export_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = prompt_table(50, seed=1)
    export_table(old, tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(export, "SQL_BATCH_ROWS", 10)
    real_insert = export.insert_batch
    calls = []

    def insert_then_fail(conn: Any, target: Any, batch: Any) -> None:
        calls.append(batch.num_rows)
        real_insert(conn, target, batch)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(export, "insert_batch", insert_then_fail)
    with pytest.raises(OSError, match="simulated"):
        export_table(prompt_table(80, seed=2), tmp_path)
    assert calls == [10, 10, 10]  # it failed with rows of the new table already inserted
    after = snapshot(tmp_path)
    assert after["files"] == before["files"]
    assert after["sql"].equals(old)
    assert leftovers(tmp_path) == []
    assert sqlite_tables(tmp_path / "prompts.sqlite") == ["prompts"]  # no prompts__new


def test_export_failing_between_files_leaves_the_previous_export_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = prompt_table(50, seed=1)
    export_table(old, tmp_path)
    before = snapshot(tmp_path)

    def half_then_fail(table: pa.Table, handle: Any) -> None:
        handle.write(b'{"encounter_id": "enc-2-0", ')
        raise OSError("no space left on device (simulated)")

    monkeypatch.setitem(export.FILE_WRITERS, "jsonl", ("jsonl", half_then_fail))
    with pytest.raises(OSError, match="simulated"):
        export_table(prompt_table(80, seed=2), tmp_path)
    after = snapshot(tmp_path)
    assert after["files"] == before["files"]  # the new parquet was staged but never published
    assert after["sql"].equals(old)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- input fingerprint


def test_dataset_fingerprint_hashes_the_named_tables_bytes(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    ws.tables_dir.mkdir()
    pq.write_table(pa.table({"a": [1, 2]}), ws.table_path("patients"))
    pq.write_table(pa.table({"b": ["x"]}), ws.table_path("events"))
    pq.write_table(pa.table({"c": [0.5]}), ws.table_path("notes"))
    first = dataset_fingerprint(ws, ["patients", "events"])
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert dataset_fingerprint(ws, ["events", "patients"]) == first  # fixed order
    assert dataset_fingerprint(ws, ["patients", "events", "notes"]) != first
    # the same bytes under another table's name are another data set
    ws.table_path("events").rename(tmp_path / "events.bak")
    ws.table_path("notes").rename(ws.table_path("events"))
    assert dataset_fingerprint(ws, ["patients", "events"]) != first
    (tmp_path / "events.bak").replace(ws.table_path("events"))
    assert dataset_fingerprint(ws, ["patients", "events"]) == first
    pq.write_table(pa.table({"a": [1, 3]}), ws.table_path("patients"))
    assert dataset_fingerprint(ws, ["patients", "events"]) != first
    with pytest.raises(MissingTableError, match=r"encounters\.parquet.*pmlm ingest"):
        dataset_fingerprint(ws, ["patients", "encounters"])


# ---------------------------------------------------------------- the docs' app example


def doc_example() -> dict[str, Any]:
    """Run the tested Python blocks of docs/prompt-table.md; returns what they define."""
    text = DOC.read_text()
    start = text.index("<!-- tested:")
    end = text.index("<!-- end of tested code -->")
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    assert len(blocks) >= 4
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)
    return namespace


def test_the_docs_app_example_reads_a_patients_latest_prompt(tmp_path: Path) -> None:
    table = prompt_table(60, seed=5)
    result = export_table(table, tmp_path / "export")
    example = doc_example()
    manifest = example["check_export"](tmp_path / "export")
    assert manifest["rows"] == 60

    frame = table.to_pandas()
    for patient in sorted(frame["patient_id"].unique()):
        mine = frame[(frame["patient_id"] == patient) & (frame["method"] == "pmlm_initial")]
        expected = mine.loc[mine["index_time"].idxmax()]
        row = example["latest_prompt"](tmp_path / "export", patient)
        assert row["encounter_id"] == expected["encounter_id"]
        assert row["system"] == expected["system"]
        url = result.files["sql"].rpartition("#")[0]
        assert example["latest_prompt_sql"](url, patient) == expected["system"]
        messages = example["messages_for"](row["system"], "Which vaccines are due?")
        assert messages == [
            {"role": "system", "content": expected["system"]},
            {"role": "user", "content": "Which vaccines are due?"},
        ]
    assert example["messages_for"]("", "Q?") == [{"role": "user", "content": "Q?"}]
    with pytest.raises(KeyError, match="no pmlm_initial prompt for patient nobody"):
        example["latest_prompt"](tmp_path / "export", "nobody")
    # a file that does not match the manifest is reported
    (tmp_path / "export" / "prompts.jsonl").write_text("{}\n")
    with pytest.raises(RuntimeError, match=r"does not match prompts\.manifest\.json"):
        example["check_export"](tmp_path / "export")
