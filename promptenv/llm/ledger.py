"""The call ledger: one SQLite row per backend attempt and per cache hit.

Default file: ``<workspace>/cache/llm_ledger.sqlite``, table ``calls``. Rows
carry the run id, time, backend, model, endpoint (without credentials or
query string), tokens in and out, cost, whether it was a cache hit, the
attempt number, the outcome (``ok``, ``cache_hit``, ``retry``, ``error``), the
HTTP status of a failure, latency, the wait before the next attempt, and how
many identifiers the privacy guard replaced per kind, and the budget scope it
counts against. Never a prompt, an answer, an identifier or an API key.

Table ``holds`` keeps the budget reservations of attempts in flight
(`promptenv.llm.budget`): the ledger is the budget's source of truth across
threads, processes and Dask workers.

Example::

    ledger = Ledger(workspace.cache_dir / "llm_ledger.sqlite")
    for row in ledger.summary():
        print(row.run_id, row.model, row.calls, row.cost)
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeAlias

from promptenv.llm.config import public_endpoint
from promptenv.llm.sqlite_store import SQLiteStore
from promptenv.llm.types import Spend

Outcome: TypeAlias = Literal["ok", "cache_hit", "retry", "error"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    time TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    cost REAL NOT NULL,
    cached INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    error_kind TEXT,
    latency_s REAL NOT NULL,
    wait_s REAL NOT NULL,
    redactions INTEGER NOT NULL,
    redaction_kinds TEXT NOT NULL,
    budget_scope TEXT
);
CREATE INDEX IF NOT EXISTS calls_by_run ON calls (run_id);
CREATE TABLE IF NOT EXISTS holds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    scope TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    created REAL NOT NULL,
    calls INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    cost REAL NOT NULL
)
"""
#: A hold older than this is dropped even if its process seems alive (a reused pid).
HOLD_TTL_S = 3600.0


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger row (see the module docstring for the fields)."""

    run_id: str
    request_id: str
    backend: str
    model: str
    endpoint: str | None
    tokens_in: int
    tokens_out: int
    cost: float
    cached: bool
    attempt: int
    outcome: Outcome
    latency_s: float
    status: int | None = None
    error_kind: str | None = None
    wait_s: float = 0.0
    redactions: int = 0
    redaction_kinds: str = ""
    time: str = ""
    budget_scope: str | None = None


@dataclass(frozen=True)
class LedgerSummary:
    """Totals of one run and model.

    ``calls``: requests answered by the backend or the cache; ``attempts``:
    backend attempts (retries and failures included); ``retries``: attempts
    that failed transiently and were retried; ``errors``: attempts that failed
    for good; ``tokens_in``/``tokens_out``/``cost``: billed, cache hits excluded.
    """

    run_id: str
    backend: str
    model: str
    calls: int
    attempts: int
    retries: int
    errors: int
    cache_hits: int
    tokens_in: int
    tokens_out: int
    cost: float
    redactions: int
    first: str
    last: str

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.calls if self.calls else 0.0


class Ledger:
    """Append-only record of LLM calls in the SQLite file ``path``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._store = SQLiteStore(self.path, _SCHEMA)
        connection = self._store.connection()
        columns = {row[1] for row in connection.execute("PRAGMA table_info(calls)")}
        if "budget_scope" not in columns:  # a ledger written before budget scopes
            try:
                connection.execute("ALTER TABLE calls ADD COLUMN budget_scope TEXT")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise
        connection.execute(
            "CREATE INDEX IF NOT EXISTS calls_by_scope ON calls (COALESCE(budget_scope, run_id))"
        )

    def hold(self, scope: str, needed: Spend, check: Callable[[Spend, Spend], None]) -> int:
        """Reserve ``needed`` for ``scope`` after ``check(committed, needed)`` passed, in
        one write transaction (no other process can reserve in between); the hold's id.

        ``committed`` is what the scope's attempts used plus the live holds. Holds
        of processes that are gone are dropped first.
        """
        connection = self._store.connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            self._drop_dead_holds(connection)
            held = connection.execute(
                "SELECT COUNT(*), COALESCE(SUM(tokens), 0), COALESCE(SUM(cost), 0) "
                "FROM holds WHERE scope = ?",
                (scope,),
            ).fetchone()
            # a hold stands for one call, whatever it reserves
            committed = self._spend(connection, scope) + Spend(
                calls=int(held[0]), tokens=int(held[1]), cost=float(held[2])
            )
            check(committed, needed)
            cursor = connection.execute(
                "INSERT INTO holds (scope, host, pid, created, calls, tokens, cost) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    scope,
                    socket.gethostname(),
                    os.getpid(),
                    time.time(),
                    needed.calls,
                    needed.tokens,
                    needed.cost,
                ),
            )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return int(cursor.lastrowid or 0)

    def release(self, hold: int) -> None:
        """Drop a hold whose attempt recorded no row."""
        self._store.connection().execute("DELETE FROM holds WHERE id = ?", (hold,))

    def _drop_dead_holds(self, connection: sqlite3.Connection) -> None:
        host = socket.gethostname()
        rows = connection.execute("SELECT id, host, pid, created FROM holds").fetchall()
        dead = [
            (r[0],)
            for r in rows
            if time.time() - r[3] > HOLD_TTL_S or (r[1] == host and not _alive(int(r[2])))
        ]
        connection.executemany("DELETE FROM holds WHERE id = ?", dead)

    def record(self, entry: LedgerEntry, hold: int | None = None) -> None:
        """Append one row (and drop the budget ``hold`` of its attempt in the same
        transaction); the time is now (UTC) unless the entry has one."""
        when = entry.time or datetime.now(UTC).isoformat(timespec="milliseconds")
        connection = self._store.connection()
        if hold is not None:
            connection.execute("BEGIN IMMEDIATE")
        try:
            self._insert(connection, entry, when)
            if hold is not None:
                connection.execute("DELETE FROM holds WHERE id = ?", (hold,))
                connection.execute("COMMIT")
        except BaseException:
            if hold is not None:
                connection.execute("ROLLBACK")
            raise

    def _insert(self, connection: sqlite3.Connection, entry: LedgerEntry, when: str) -> None:
        connection.execute(
            "INSERT INTO calls (run_id, request_id, time, backend, model, endpoint, tokens_in, "
            "tokens_out, cost, cached, attempt, outcome, status, error_kind, latency_s, "
            "wait_s, redactions, redaction_kinds, budget_scope) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.run_id,
                entry.request_id,
                when,
                entry.backend,
                entry.model,
                public_endpoint(entry.endpoint) if entry.endpoint else None,
                entry.tokens_in,
                entry.tokens_out,
                entry.cost,
                int(entry.cached),
                entry.attempt,
                entry.outcome,
                entry.status,
                entry.error_kind,
                entry.latency_s,
                entry.wait_s,
                entry.redactions,
                entry.redaction_kinds,
                entry.budget_scope,
            ),
        )

    def entries(self, run_id: str | None = None) -> list[LedgerEntry]:
        """Every row, oldest first; only ``run_id``'s when given."""
        query = (
            "SELECT run_id, request_id, backend, model, endpoint, tokens_in, tokens_out, cost, "
            "cached, attempt, outcome, latency_s, status, error_kind, wait_s, redactions, "
            "redaction_kinds, time, budget_scope FROM calls"
        )
        args: tuple[str, ...] = ()
        if run_id is not None:
            query += " WHERE run_id = ?"
            args = (run_id,)
        connection = self._store.connection()
        rows = connection.execute(query + " ORDER BY id", args).fetchall()
        return [
            LedgerEntry(
                run_id=r[0],
                request_id=r[1],
                backend=r[2],
                model=r[3],
                endpoint=r[4],
                tokens_in=r[5],
                tokens_out=r[6],
                cost=r[7],
                cached=bool(r[8]),
                attempt=r[9],
                outcome=r[10],
                latency_s=r[11],
                status=r[12],
                error_kind=r[13],
                wait_s=r[14],
                redactions=r[15],
                redaction_kinds=r[16],
                time=r[17],
                budget_scope=r[18],
            )
            for r in rows
        ]

    def spend(self, scope: str) -> Spend:
        """What budget ``scope`` (a run id by default) has used: backend attempts, billed
        tokens, cost."""
        return self._spend(self._store.connection(), scope)

    @staticmethod
    def _spend(connection: sqlite3.Connection, scope: str) -> Spend:
        row = connection.execute(
            "SELECT COUNT(*), COALESCE(SUM(tokens_in + tokens_out), 0), COALESCE(SUM(cost), 0) "
            "FROM calls WHERE COALESCE(budget_scope, run_id) = ? AND cached = 0",
            (scope,),
        ).fetchone()
        return Spend(calls=int(row[0]), tokens=int(row[1]), cost=float(row[2]))

    def summary(self, run_id: str | None = None) -> list[LedgerSummary]:
        """Totals per run and model, oldest run first."""
        where, args = ("WHERE run_id = ?", (run_id,)) if run_id is not None else ("", ())
        query = f"""
            SELECT run_id, backend, model,
                   COUNT(DISTINCT CASE WHEN outcome IN ('ok', 'cache_hit') THEN request_id END),
                   SUM(cached = 0),
                   SUM(outcome = 'retry'),
                   SUM(outcome = 'error'),
                   SUM(outcome = 'cache_hit'),
                   SUM(CASE WHEN cached = 0 THEN tokens_in ELSE 0 END),
                   SUM(CASE WHEN cached = 0 THEN tokens_out ELSE 0 END),
                   SUM(cost),
                   SUM(CASE WHEN attempt <= 1 THEN redactions ELSE 0 END),
                   MIN(time), MAX(time)
            FROM calls {where}
            GROUP BY run_id, backend, model
            ORDER BY MIN(time), run_id, backend, model
        """
        connection = self._store.connection()
        rows = connection.execute(query, args).fetchall()
        return [
            LedgerSummary(
                run_id=r[0],
                backend=r[1],
                model=r[2],
                calls=int(r[3]),
                attempts=int(r[4]),
                retries=int(r[5]),
                errors=int(r[6]),
                cache_hits=int(r[7]),
                tokens_in=int(r[8]),
                tokens_out=int(r[9]),
                cost=float(r[10]),
                redactions=int(r[11]),
                first=r[12],
                last=r[13],
            )
            for r in rows
        ]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
