"""Signatures of executable workspace files: sealed data, .sig files, the secret's mode."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

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
