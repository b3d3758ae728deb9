"""Integrity of executable workspace files: an HMAC under a per-workspace secret.

A shared workspace is writable by whoever runs the pipeline's workers, and some
of its files are code in disguise: a pickled Prefect task result, a
stable-baselines3 policy zip with cloudpickled entries. Loading a doctored one
runs the doctor's code as the pipeline's user. So such files are signed when
written and checked before they are loaded:

- the secret is 32 random bytes in ``WORKSPACE/private/secret`` (mode 0600, in
  a folder of mode 0700), made on first use; whoever cannot read it cannot sign;
- `seal` prefixes data with a magic line and its HMAC-SHA256; `unseal` checks
  and strips them, or raises `TamperedFileError`;
- `signature` is the content of ``FILE.sig`` (the HMAC of the file, in hex),
  written beside a file whose format other tools read (the policy zip);
  `verify_file` checks it.

An unsigned or wrongly signed file is refused with one line saying which file
and what to do; nothing of it is loaded. Deleting the secret invalidates every
signature (the files are recomputed, or the policy retrained).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import string
import time
from pathlib import Path

from pipelines.errors import StaleStateError

SECRET_FILE = "secret"
MAGIC = b"PMLM-HMAC-SHA256\n"
_DIGEST = hashlib.sha256().digest_size


class TamperedFileError(StaleStateError):
    """A workspace file that could run code when loaded and is not proven safe: it is not loaded
    (exit code 5, as for other unusable state: recompute it)."""


def secret_path(workspace_root: Path) -> Path:
    return workspace_root / "private" / SECRET_FILE


#: How long a reader waits for a secret that another process or thread has just created
#: to be written whole (it is created empty, then written).
_SECRET_WAIT_SECONDS = 5.0


def secret_text(path: Path, damaged: str) -> str:
    """The secret in ``path`` (64 hex digits), made (mode 0600, in a folder of mode 0700)
    if there is none.

    Whoever creates it first writes it; a process or thread that finds it created but
    not yet written waits for it (up to `_SECRET_WAIT_SECONDS`), so that no one ever
    signs or hashes with a half-written secret. One that is still not 64 hex digits
    is damaged: an error that says so, with ``damaged`` (what to do) after it.
    """
    if not path.exists():  # a read-only reader of a made workspace never writes
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made meanwhile by another: wait for it below
            pass
        else:
            os.chmod(path.parent, 0o700)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
    deadline = time.monotonic() + _SECRET_WAIT_SECONDS
    while True:
        text = path.read_text().strip()
        if len(text) == 64 and all(c in string.hexdigits for c in text):
            return text
        if time.monotonic() > deadline:
            raise StaleStateError(f"{path} is not a secret of 64 hex digits: {damaged}")
        time.sleep(0.01)


def workspace_secret(workspace_root: Path) -> bytes:
    """The workspace's secret, made (mode 0600) if it has none."""
    return bytes.fromhex(
        secret_text(
            secret_path(workspace_root),
            "delete it; every signed file is then refused and recomputed, and the policy "
            "must be trained again",
        )
    )


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def seal(workspace_root: Path, data: bytes) -> bytes:
    """``data`` with the magic line and its HMAC in front."""
    return MAGIC + _mac(workspace_secret(workspace_root), data) + data


def unseal(workspace_root: Path, blob: bytes, what: str) -> bytes:
    """The data `seal` wrapped, or `TamperedFileError` naming ``what``."""
    head = len(MAGIC) + _DIGEST
    if not blob.startswith(MAGIC) or len(blob) < head:
        raise TamperedFileError(
            f"{what} carries no signature of this workspace, so it is not loaded (it may run "
            f"code): delete it to have it recomputed"
        )
    tag, data = blob[len(MAGIC) : head], blob[head:]
    if not hmac.compare_digest(tag, _mac(workspace_secret(workspace_root), data)):
        raise TamperedFileError(
            f"{what} was changed after this workspace wrote it (its signature does not match), "
            "so it is not loaded (it may run code): delete it to have it recomputed"
        )
    return data


def signature_path(path: Path) -> Path:
    return path.with_name(path.name + ".sig")


def signature(workspace_root: Path, data: bytes) -> bytes:
    """The ``FILE.sig`` content for a file holding ``data``: its HMAC in hex."""
    return _mac(workspace_secret(workspace_root), data).hex().encode()


def verify_file(workspace_root: Path, path: Path, remedy: str) -> None:
    """Raise `TamperedFileError` unless ``path`` carries this workspace's signature."""
    sig = signature_path(path)
    if not sig.exists():
        raise TamperedFileError(
            f"{path} has no signature ({sig.name}), so it is not loaded (it may run code): {remedy}"
        )
    expected = signature(workspace_root, path.read_bytes())
    if not hmac.compare_digest(sig.read_bytes().strip(), expected):
        raise TamperedFileError(
            f"{path} was changed after this workspace wrote it (its signature does not match), "
            f"so it is not loaded (it may run code): {remedy}"
        )
