"""One SQLite file shared by threads and processes: WAL mode, busy timeout, a connection per thread.

Connections live as long as their thread: opening and closing one per
operation made every write pay a WAL checkpoint (about 15 ms a call).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

BUSY_TIMEOUT_S = 60.0


def connect(path: Path) -> sqlite3.Connection:
    """An autocommit connection that waits up to ``BUSY_TIMEOUT_S`` for other writers."""
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    # with WAL, NORMAL cannot corrupt the file; a power cut may lose the last
    # commits (answers are then recomputed), an application crash loses nothing
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


class SQLiteStore:
    """The file ``path``, created with ``schema`` (statements separated by ``;``) if needed."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        setup = connect(path)
        try:
            # processes may race here: journal_mode and CREATE ... IF NOT EXISTS are idempotent
            setup.execute("PRAGMA journal_mode=WAL")
            setup.execute("BEGIN IMMEDIATE")
            for statement in schema.split(";"):
                if statement.strip():
                    setup.execute(statement)
            setup.execute("COMMIT")
        finally:
            setup.close()

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (a new one after a fork)."""
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None or self._local.pid != os.getpid():
            connection = connect(self.path)
            self._local.connection = connection
            self._local.pid = os.getpid()
        return connection
