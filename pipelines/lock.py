"""The workspace lock: one writer at a time, across processes and hosts of a shared file system.

An advisory ``flock`` on ``WORKSPACE/.lock`` (the standard library's
``fcntl.flock``; on NFS Linux maps it to a byte-range lock the server
enforces). The file names its holder: pid, host, command and since when, so a
second writer that cannot wait says who holds the workspace. The lock is the
process's: its threads share it, and a step that takes it again (a nested
transaction) only counts up. The kernel drops it when its process dies, so a
killed step never leaves the workspace locked. ``filelock`` would do the
locking but not keep the holder's record in the lock file, which is the point
of the message.

Readers take no lock: the transactions (`pipelines.workspace`) keep what they
read complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

#: Seconds a writer waits for the lock when not told (``--wait`` sets it).
WAIT_ENV = "PMLM_LOCK_WAIT"
LOCK_FILE = ".lock"
_POLL_S = 0.1


class WorkspaceBusy(RuntimeError):
    """Another process holds the workspace's lock."""


@dataclass
class _Held:
    fd: int
    depth: int


_held: dict[Path, _Held] = {}
_guard = threading.Lock()


def default_wait() -> float:
    """Seconds to wait for the lock: ``$PMLM_LOCK_WAIT`` (default 0: fail at once)."""
    value = os.environ.get(WAIT_ENV, "0")
    try:
        return max(0.0, float(value))
    except ValueError:
        raise ValueError(f"{WAIT_ENV}={value!r} is not a number of seconds") from None


def holder(root: Path) -> str:
    """Who holds (or last held) the lock of workspace ``root``, in words."""
    try:
        info = json.loads((root / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (
        f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command')}`, "
        f"since {info.get('since')})"
    )


def acquire(root: Path, wait: float | None = None) -> bool:
    """Take the lock of workspace ``root``, waiting up to ``wait`` seconds (default
    `default_wait`); raises `WorkspaceBusy` naming the holder. True when this call
    took it from the system (False: this process held it already)."""
    key = root.resolve()
    with _guard:
        held = _held.get(key)
        if held is not None:
            held.depth += 1
            return False
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + (default_wait() if wait is None else wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise WorkspaceBusy(
                        f"workspace {root} is being written by {holder(root)}: wait for it "
                        f"to finish, or pass --wait SECONDS (or set {WAIT_ENV}) to queue behind it"
                    ) from None
                time.sleep(_POLL_S)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join(sys.argv)[:300],
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _held[key] = _Held(fd, 1)
        return True


def release(root: Path) -> None:
    """Give back one hold of the lock (the last one unlocks)."""
    key = root.resolve()
    with _guard:
        held = _held[key]
        held.depth -= 1
        if held.depth:
            return
        del _held[key]
        fcntl.flock(held.fd, fcntl.LOCK_UN)
        os.close(held.fd)


def holds(root: Path) -> bool:
    """Whether this process holds the lock of ``root``."""
    with _guard:
        return root.resolve() in _held


def try_acquire(root: Path) -> bool:
    """Take the lock if it is free now; False (holding nothing) when another has it."""
    try:
        acquire(root, wait=0)
    except WorkspaceBusy:
        return False
    return True
