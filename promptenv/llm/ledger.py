"""The call ledger: one SQLite row per backend attempt and per cache hit.

Default file: ``<workspace>/cache/llm_ledger.sqlite``, table ``calls``. Rows
carry the run id, time, backend, model, endpoint (without credentials or
query string), tokens in and out, cost, whether it was a cache hit, the
attempt number, the outcome (``ok``, ``cache_hit``, ``retry``, ``error``), the
HTTP status of a failure, latency, the wait before the next attempt, and how
many identifiers the privacy guard replaced per kind. Never a prompt, an
answer, an identifier or an API key.

Example::

    ledger = Ledger(workspace.cache_dir / "llm_ledger.sqlite")
    for row in ledger.summary():
        print(row.run_id, row.model, row.calls, row.cost)
"""

from __future__ import annotations

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
    redaction_kinds TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_by_run ON calls (run_id)
"""


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

    def record(self, entry: LedgerEntry) -> None:
        """Append one row; the time is now (UTC) unless the entry has one."""
        when = entry.time or datetime.now(UTC).isoformat(timespec="milliseconds")
        connection = self._store.connection()
        connection.execute(
            "INSERT INTO calls (run_id, request_id, time, backend, model, endpoint, tokens_in, "
            "tokens_out, cost, cached, attempt, outcome, status, error_kind, latency_s, "
            "wait_s, redactions, redaction_kinds) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            ),
        )

    def entries(self, run_id: str | None = None) -> list[LedgerEntry]:
        """Every row, oldest first; only ``run_id``'s when given."""
        query = (
            "SELECT run_id, request_id, backend, model, endpoint, tokens_in, tokens_out, cost, "
            "cached, attempt, outcome, latency_s, status, error_kind, wait_s, redactions, "
            "redaction_kinds, time FROM calls"
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
            )
            for r in rows
        ]

    def spend(self, run_id: str) -> Spend:
        """What ``run_id`` has used against its budget: backend attempts, billed tokens, cost."""
        connection = self._store.connection()
        row = connection.execute(
            "SELECT COUNT(*), COALESCE(SUM(tokens_in + tokens_out), 0), COALESCE(SUM(cost), 0) "
            "FROM calls WHERE run_id = ? AND cached = 0",
            (run_id,),
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
