"""The cached tasks' results are signed: a doctored cache record is refused, never unpickled."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from flows.result_storage import SignedLocalFileSystem
from flows.tasks import cache_storage, in_workspace
from pipelines.integrity import MAGIC, TamperedFileError


@task(cache_policy=INPUTS + TASK_SOURCE)
def _counted(counter: str, value: int) -> dict[str, int]:
    """A cached task that counts its runs in the file ``counter``."""
    path = Path(counter)
    runs = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(runs))
    return {"value": value * 2}


def _run(workspace: Path, counter: Path, storage: Any = None) -> dict[str, int]:
    @flow
    def once() -> dict[str, int]:
        cached = in_workspace(_counted, workspace)
        if storage is not None:
            storage.save("plain-test-storage", overwrite=True, _sync=True)
            cached = cached.with_options(result_storage=storage)
        return cached(str(counter), 21)

    return once()


class _Planted:
    """Unpickling it creates the file ``marker``: what an attacker's record would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _doctored_record(marker: Path) -> bytes:
    """A well-formed Prefect result record, unsigned, whose result runs code when read."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    metadata = ResultRecordMetadata(serializer=PickleSerializer(), storage_key="planted")
    return ResultRecord(metadata=metadata, result=_Planted(marker)).serialize()


def test_records_are_signed_and_an_altered_one_is_refused(tmp_path: Path) -> None:
    storage = cache_storage(tmp_path / "ws")
    assert isinstance(storage, SignedLocalFileSystem)
    storage.write_path("key", b"payload", _sync=True)
    written = Path(storage.basepath) / "key"
    assert written.read_bytes().startswith(MAGIC)
    assert storage.read_path("key", _sync=True) == b"payload"

    written.write_bytes(written.read_bytes()[:-1] + b"P")
    with pytest.raises(TamperedFileError, match="changed after this workspace wrote it"):
        storage.read_path("key", _sync=True)
    written.write_bytes(b"payload")
    with pytest.raises(TamperedFileError, match="carries no signature"):
        storage.read_path("key", _sync=True)
    # a record signed by another workspace is refused too
    other = cache_storage(tmp_path / "other")
    other.write_path("key", b"payload", _sync=True)
    written.write_bytes((Path(other.basepath) / "key").read_bytes())
    with pytest.raises(TamperedFileError):
        storage.read_path("key", _sync=True)


def test_a_doctored_cache_record_runs_no_code_and_the_task_runs_again(
    prefect_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws, counter, marker = tmp_path / "ws", tmp_path / "runs", tmp_path / "pwned"
    assert _run(ws, counter) == {"value": 42}
    assert _run(ws, counter) == {"value": 42}
    assert counter.read_text() == "1", "the second run did not come from the cache"

    records = [p for p in (ws / "cache" / "prefect").rglob("*") if p.is_file()]
    assert len(records) == 1
    records[0].write_bytes(_doctored_record(marker))

    with caplog.at_level(logging.WARNING, logger="flows.result_storage"):
        assert _run(ws, counter) == {"value": 42}
    assert not marker.exists(), "the doctored record was unpickled"
    assert counter.read_text() == "2", "the task did not run again"
    assert "carries no signature" in caplog.text and str(records[0]) in caplog.text
    assert records[0].read_bytes().startswith(MAGIC), "the refused record was not replaced"
    assert _run(ws, counter) == {"value": 42}
    assert counter.read_text() == "2"


def test_without_the_signature_the_same_record_would_run_code(
    prefect_server: str, tmp_path: Path
) -> None:
    """The threat is real: Prefect's own local storage unpickles the planted record on lookup."""
    from prefect.filesystems import LocalFileSystem

    folder, counter, marker = tmp_path / "plain", tmp_path / "runs", tmp_path / "pwned"
    plain = LocalFileSystem(basepath=str(folder))
    assert _run(tmp_path / "ws", counter, plain) == {"value": 42}
    records = [p for p in folder.rglob("*") if p.is_file()]
    assert len(records) == 1
    records[0].write_bytes(_doctored_record(marker))
    _run(tmp_path / "ws", counter, plain)  # returns the planted object: an open file
    assert marker.exists()
    assert counter.read_text() == "1", "the planted record was taken as the cached result"


def test_a_temporary_server_that_does_not_start_is_one_line(tmp_path: Path) -> None:
    """No traceback: what went wrong and what to do, exit code 4 (a setting)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1",
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pmlm"), "run", "--workspace", str(tmp_path / "ws")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 4, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("error: the temporary Prefect server did not start within 1 s")
    assert "PREFECT_API_URL" in errors[0]
    assert "Traceback" not in done.stderr and "│" not in done.stderr  # no (rich) traceback
