"""Signatures of executable workspace files: sealed data, .sig files, the secret's mode."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pipelines.errors import StaleStateError
from pipelines.integrity import (
    TamperedFileError,
    seal,
    secret_path,
    signature,
    signature_path,
    unseal,
    verify_file,
)


def test_sealed_data_round_trips_and_a_change_is_refused(tmp_path: Path) -> None:
    blob = seal(tmp_path, b"payload")
    assert stat.S_IMODE(secret_path(tmp_path).stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_path(tmp_path).parent.stat().st_mode) == 0o700
    assert unseal(tmp_path, blob, "result x") == b"payload"
    with pytest.raises(TamperedFileError, match=r"^result x was changed after .* delete it"):
        unseal(tmp_path, blob[:-1] + b"!", "result x")
    with pytest.raises(TamperedFileError, match="result x carries no signature"):
        unseal(tmp_path, b"\x80\x04 a plain pickle", "result x")
    other = tmp_path / "other"
    with pytest.raises(TamperedFileError, match="was changed"):  # another workspace's secret
        unseal(other, blob, "result x")


def test_a_signed_file_is_checked_before_use(tmp_path: Path) -> None:
    path = tmp_path / "policy.zip"
    path.write_bytes(b"zip bytes")
    with pytest.raises(TamperedFileError, match=r"policy.zip has no signature .*: retrain it"):
        verify_file(tmp_path, path, "retrain it")
    signature_path(path).write_bytes(signature(tmp_path, b"zip bytes"))
    verify_file(tmp_path, path, "retrain it")
    path.write_bytes(b"zip bytes with code")
    with pytest.raises(TamperedFileError, match=r"policy.zip was changed .*: retrain it$"):
        verify_file(tmp_path, path, "retrain it")


def test_a_secret_made_by_another_thread_is_never_read_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many threads' first use of one workspace: one makes the secret, and while it writes
    (slowly, here) the others wait for it instead of reading the empty file."""
    import os
    import threading
    import time

    import pipelines.integrity as integrity

    opened = os.fdopen

    def slow_fdopen(fd: int, *args: object, **kwargs: object) -> object:
        time.sleep(0.2)  # the file exists, empty, meanwhile
        return opened(fd, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(integrity.os, "fdopen", slow_fdopen)
    start = threading.Barrier(8)
    keys: list[bytes] = []

    def first_use() -> None:
        start.wait()
        keys.append(integrity.workspace_secret(tmp_path))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 32


def test_a_damaged_secret_is_one_line_saying_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.integrity as integrity
    from pipelines.identity import workspace_salt
    from pipelines.workspace import Workspace

    monkeypatch.setattr(integrity, "_SECRET_WAIT_SECONDS", 0.05)
    monkeypatch.delenv("PMLM_PSEUDONYM_SALT", raising=False)
    path = secret_path(tmp_path)
    path.parent.mkdir()
    path.write_text("abc\n")
    with pytest.raises(
        StaleStateError, match=r"secret is not a secret of 64 hex digits: delete it"
    ):
        integrity.workspace_secret(tmp_path)
    salt = tmp_path / "private" / "pseudonym.key"
    salt.write_text("")
    with pytest.raises(StaleStateError, match=r"pseudonym.key is not .*: restore it from a backup"):
        workspace_salt(Workspace.at(tmp_path))
