"""Workspace I/O: schema checks, atomic writes, manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.ingest import load_tables
from pipelines.lock import WorkspaceBusy
from pipelines.workspace import (
    FAULT_ENV,
    IncompleteWorkspaceError,
    MissingTableError,
    Workspace,
    atomic_write_bytes,
    to_arrow,
)


def _patients(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": [f"p{i}" for i in range(n)],
            "birth_date": [pd.Timestamp("1990-01-01").date()] * n,
            "sex": "female",
            "deceased_time": pd.NaT,
            "race": None,
            "ethnicity": None,
            "source": "test",
            "source_file": None,
        }
    )


def test_round_trip_and_readable_permissions(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    path = ws.write_table("patients", _patients(3))
    assert list(ws.read_table("patients")["patient_id"]) == ["p0", "p1", "p2"]
    assert os.stat(path).st_mode & 0o044 == 0o044  # group and others may read the table
    assert not list(ws.tables_dir.glob(".*tmp"))


def test_schema_violations_name_the_table(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    with pytest.raises(ValueError, match=r"table 'patients': missing columns \['sex'\]"):
        ws.write_table("patients", _patients(1).drop(columns="sex"))
    bad = _patients(1).assign(patient_id=[None])
    with pytest.raises(ValueError, match="table 'patients' does not fit its schema"):
        ws.write_table("patients", bad)


def test_a_failed_write_keeps_the_previous_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = Workspace.at(tmp_path)
    ws.write_table("patients", _patients(2))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("pipelines.workspace.pq.write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        ws.write_table("patients", _patients(5))
    monkeypatch.undo()
    assert len(ws.read_table("patients")) == 2
    assert not list(ws.tables_dir.glob(".*tmp"))


def test_missing_table_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(MissingTableError, match="run `pmlm ingest"):
        Workspace.at(tmp_path).read_table("events")


def test_manifest_records_steps(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    ws.record_step("ingest", {"input": "x"})
    ws.record_step("fit", {"model": "y"})
    steps = ws.read_manifest()["steps"]
    assert steps["ingest"]["input"] == "x" and steps["fit"]["model"] == "y"
    assert "finished_at" in steps["fit"]


# -- transactions, the lock, crashes -------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("crash_writers.py")


def run_step(*args: str, fault: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(FAULT_ENV, None)
    if fault is not None:
        env[FAULT_ENV] = str(fault)
    return subprocess.run(
        [sys.executable, str(WRITER), *args], env=env, capture_output=True, text=True, timeout=300
    )


def state(ws: Workspace) -> dict[str, object]:
    """Every table (as read, which finishes a committed step), the saved models' files and
    the manifest's steps."""
    tables = load_tables(ws)
    steps = {k: {**v, "finished_at": None} for k, v in ws.read_manifest()["steps"].items()}
    steps = json.loads(json.dumps(steps).replace(str(ws.root), "WORKSPACE"))
    models = {
        str(f.relative_to(ws.root)): f.read_bytes()
        for f in sorted(ws.models_dir.rglob("*"))
        if f.is_file() and f.suffix == ".json"
    }
    return {
        "steps": steps,
        "models": models,
        **{n: pa.Table.from_pandas(t) for n, t in tables.items()},
        **prompt_build(ws),
    }


def prompt_build(ws: Workspace) -> dict[str, object]:
    """The prompt table (but its ``created_at``) and the refresh state the next build
    compares with, checked to belong together: the build records the table's sha256."""
    import pyarrow.parquet as pq

    from pipelines.export import file_sha256

    table, build_json = ws.table_path("prompts"), ws.cache_dir / "refresh" / "build.json"
    assert table.exists() == build_json.exists(), "a prompt table without its build, or back"
    if not table.exists():
        return {}
    build = json.loads(build_json.read_text())
    assert build["table_sha256"] == file_sha256(table), "the table of another build"
    found: dict[str, object] = {
        "prompts": pq.read_table(table).drop(["created_at"]),
        "build": {k: v for k, v in build.items() if k not in ("written_at", "table_sha256")},
    }
    for name in ("patients", "states", "queries"):
        found[f"refresh/{name}"] = pq.read_table(ws.cache_dir / "refresh" / f"{name}.parquet")
    return found


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].equals(b[k]) if isinstance(a[k], pa.Table) else a[k] == b[k]  # type: ignore[attr-defined]
        for k in a
    )


def differing(a: dict[str, object], b: dict[str, object]) -> list[str]:
    """The keys whose values differ (or that only one side has)."""
    return sorted(
        k for k in a.keys() | b.keys() if k not in a or k not in b or not same({k: a[k]}, {k: b[k]})
    )


def kill_at_every_boundary(
    tmp_path: Path, first: list[str], second: list[str], before: int = 8, after: int = 8
) -> int:
    """Run step ``first``, then ``second`` over it, killed after its 1st, 2nd, ... write
    until it finishes; after each kill the workspace must be the first state or the state
    of ``second`` run over ``first`` unkilled."""
    old_root, new_root = tmp_path / "old", tmp_path / "new"
    assert run_step(first[0], str(old_root), first[1]).returncode == 0
    shutil.copytree(old_root, new_root)  # the new state: the second step over the first
    assert run_step(second[0], str(new_root), second[1]).returncode == 0
    old, new = state(Workspace.at(old_root)), state(Workspace.at(new_root))
    assert not same(old, new)
    seen = {"old": 0, "new": 0}
    for k in range(1, 100):
        root = tmp_path / f"ws-{k}"
        shutil.copytree(old_root, root)
        done = run_step(second[0], str(root), second[1], fault=k)
        got = state(Workspace.at(root))
        if same(got, new):
            seen["new"] += 1
        else:
            assert same(got, old), (
                f"kill after write {k}: neither the old state nor the new; unlike the new: "
                f"{differing(got, new)}, unlike the old: {differing(got, old)}"
            )
            seen["old"] += 1
        assert not list(root.glob(".txn/*/COMMIT")), k  # a committed step: finished by the reader
        Workspace.at(root).record_step("next", {})  # the next writer drops an uncommitted one
        assert not list(root.glob(".txn/*")), k
        shutil.rmtree(root)
        if done.returncode == 0:
            break
        assert done.returncode == 9, done.stderr[-2000:]
    # kills before and after the commit point
    assert seen["old"] >= before and seen["new"] >= after, seen
    return k


@pytest.mark.slow
def test_a_killed_ingest_leaves_the_old_state_or_the_new(tmp_path: Path) -> None:
    writes = kill_at_every_boundary(tmp_path, ["cohort", "12"], ["cohort", "20"])
    assert writes >= 18  # 8 tables staged, the commit point, 8 tables and the manifest renamed


@pytest.mark.slow
def test_a_killed_fhir_ingest_leaves_the_old_state_or_the_new(tmp_path: Path) -> None:
    from test_fhir import tiny_bundle, write

    one, two = tmp_path / "one", tmp_path / "two"
    write(one, "a.json", tiny_bundle())
    write(two, "a.json", tiny_bundle())
    write(two, "b.json", tiny_bundle())  # the same ids again: quarantined duplicates
    kill_at_every_boundary(tmp_path, ["fhir", str(one)], ["fhir", str(two)])


@pytest.mark.slow
def test_a_killed_fit_leaves_the_old_models_or_the_new(tmp_path: Path) -> None:
    """The recommender fit saves model folders, the selection and its manifest entry."""
    old = tmp_path / "old"
    assert run_step("fit", str(old), "popularity").returncode == 0
    shutil.copytree(old, tmp_path / "base")
    # both runs start from the same synthetic tables: copy them, then fit again
    kill_at_every_boundary(
        tmp_path / "k",
        ["copy", str(tmp_path / "base")],
        ["fit", "popularity,repeat_previous"],
        before=3,
        after=3,
    )


@pytest.mark.slow
def test_a_killed_prompt_build_leaves_the_old_build_or_the_new(tmp_path: Path) -> None:
    """The prompt table, the refresh state (build.json and its parquet files) and the
    manifest entry publish together: a kill leaves the one-method build whole, or the
    three-method one, never a table beside the other build's state."""
    old = tmp_path / "old"
    assert run_step("prompts", str(old), "latest:general").returncode == 0
    shutil.copytree(old, tmp_path / "base")
    writes = kill_at_every_boundary(
        tmp_path / "k",
        ["copy", str(tmp_path / "base")],
        ["prompts", "latest:general,self,pmlm_initial"],
        before=5,
        after=5,
    )
    assert writes >= 11  # 5 files staged, the commit point, 5 files and the manifest renamed


def _export_rows(folder: Path) -> tuple[int, int, int] | None:
    """Rows of the export in ``folder`` by its manifest, its Parquet and its JSONL file (None:
    no export), after a reader finished a committed one."""
    import pyarrow.parquet as pq

    from pipelines.workspace import recover

    recover(folder)
    manifest = folder / "prompts.manifest.json"
    if not manifest.exists():
        return None
    rows = json.loads(manifest.read_text())["rows"]
    parquet = pq.read_table(folder / "prompts.parquet").num_rows
    jsonl = len((folder / "prompts.jsonl").read_text().splitlines())
    return rows, parquet, jsonl


def test_a_killed_export_leaves_the_old_files_or_the_new(tmp_path: Path) -> None:
    """The files and the manifest publish together: after a kill at any write, the export
    is wholly the old one (3 rows) or wholly the new one (5 rows)."""
    old_root = tmp_path / "old"
    assert run_step("export", str(old_root), "3").returncode == 0
    assert _export_rows(old_root / "export") == (3, 3, 3)
    seen = {3: 0, 5: 0}
    for k in range(1, 100):
        root = tmp_path / f"ws-{k}"
        shutil.copytree(old_root, root)
        done = run_step("export", str(root), "5", fault=k)
        got = _export_rows(root / "export")
        assert got in {(3, 3, 3), (5, 5, 5)}, f"kill after write {k}: a mixed export {got}"
        assert got is not None
        seen[got[0]] += 1
        shutil.rmtree(root)
        if done.returncode == 0:
            break
        assert done.returncode == 9, done.stderr[-2000:]
    assert seen[3] >= 1 and seen[5] >= 1, seen  # kills before and after the commit point


def test_a_transaction_publishes_everything_at_its_end_or_nothing(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    ws.write_table("patients", _patients(2))
    with ws.transaction("step") as txn:
        ws.write_table("patients", _patients(5))
        atomic_write_bytes(ws.models_dir / "m.json", b"{}")
        ws.record_step("step", {"n": 5})
        assert len(pq.read_table(ws.table_path("patients"))) == 2  # others still see the old
        assert len(ws.read_table("patients")) == 5  # the step sees what it wrote
        assert not (ws.models_dir / "m.json").exists() and txn.staged
    assert len(pq.read_table(ws.table_path("patients"))) == 5
    assert (ws.models_dir / "m.json").read_bytes() == b"{}"
    manifest = ws.read_manifest()
    assert manifest["steps"]["step"]["n"] == 5 and manifest["generation"] == 2
    with pytest.raises(RuntimeError, match="boom"), ws.transaction("failing"):
        ws.write_table("patients", _patients(9))
        raise RuntimeError("boom")
    assert len(ws.read_table("patients")) == 5 and ws.generation() == 2
    assert not list(tmp_path.glob(".txn/*"))


def test_files_are_fsynced_before_their_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = Workspace.at(tmp_path)
    synced: set[int] = set()
    unsynced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(src).is_file() and os.stat(src).st_ino not in synced:
            unsynced.append(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with ws.transaction("step"):
        ws.write_table("patients", _patients(3))
        ws.record_step("step", {})
    atomic_write_bytes(tmp_path / "x.json", b"1")
    assert not unsynced


def test_a_second_writer_fails_naming_the_holder_or_waits(tmp_path: Path) -> None:
    signal = tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, str(WRITER), "hold", str(tmp_path / "ws"), str(signal)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        ws = Workspace.at(tmp_path / "ws")
        with pytest.raises(WorkspaceBusy) as caught:
            ws.write_table("patients", _patients(1))
        message = str(caught.value)
        assert f"pid {holder.pid}" in message and "crash_writers.py hold" in message
        assert "--wait" in message and "\n" not in message
        started = time.monotonic()
        with pytest.raises(WorkspaceBusy), ws.transaction("second", wait=0.5):
            pass
        assert time.monotonic() - started >= 0.5
        threading.Timer(0.5, signal.touch).start()
        with ws.transaction("second", wait=30):  # queues behind the first
            ws.write_table("patients", _patients(1))
        assert len(ws.read_table("patients")) == 1
    finally:
        signal.touch()
        holder.wait(timeout=30)


def test_two_concurrent_ingests_queue_and_both_finish(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PMLM_LOCK_WAIT": "120"}
    root = tmp_path / "ws"
    runs = [
        subprocess.Popen(
            [sys.executable, str(WRITER), "cohort", str(root), n],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in ("10", "15")
    ]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
    ws = Workspace.at(root)
    patients = len(ws.read_table("patients"))
    assert patients in (10, 15)
    assert ws.read_manifest()["steps"]["ingest"]["input"] == f"subset:{patients}"
    assert ws.generation() == 2 and not (root / ".staging").exists()


def test_a_reader_refuses_a_half_published_step_it_cannot_finish(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    ws.write_table("patients", _patients(2))
    journal = tmp_path / ".txn" / "ingest-x"
    (journal / "files" / "tables").mkdir(parents=True)
    pq.write_table(to_arrow("patients", _patients(7)), journal / "files/tables/patients.parquet")
    (journal / "COMMIT").write_text(
        json.dumps(
            {
                "step": "ingest",
                "files": [["files/tables/patients.parquet", "tables/patients.parquet"]],
            }
        )
    )
    signal = tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path), str(signal)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(IncompleteWorkspaceError, match=r"is being published by pid \d+"):
            ws.ensure_complete(wait=0.3)
    finally:
        signal.touch()
        holder.wait(timeout=30)
    assert len(ws.read_table("patients")) == 7  # the lock is free: the reader finishes it
    assert not journal.exists()


# Holds the bare lock (no transaction, so no recovery) until the signal file exists.
HOLD_LOCK = """
import sys, time
from pathlib import Path
from pipelines import lock
lock.acquire(Path(sys.argv[1]), wait=0)
print("holding", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.05)
"""
