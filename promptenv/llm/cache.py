"""The persistent answer cache: one SQLite file, safe for threads and processes.

The key is the sha256 of a canonical JSON of what decides the answer: the
backend and its endpoint, the model, the generation parameters and the exact
messages sent (after the privacy guard). API keys are never part of it.

SQLite runs in WAL mode with a busy timeout and one connection per thread, so
concurrent writers (threads or processes) wait for each other instead of
failing. The first answer stored for a key wins.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from promptenv.llm.sqlite_store import SQLiteStore
from promptenv.llm.types import ChatMessage, GenerationParams

CACHE_SCHEMA_VERSION = 1


def cache_key(
    backend: Mapping[str, object],
    model: str,
    params: GenerationParams,
    messages: Sequence[ChatMessage],
) -> str:
    """sha256 (hex) of the canonical JSON of the request.

    ``backend`` identifies where the request goes (kind and endpoint, never a
    key); ``messages`` are the exact messages sent.
    """
    payload = {
        "v": CACHE_SCHEMA_VERSION,
        "backend": dict(backend),
        "model": model,
        "params": params.as_json(),
        "messages": [{"role": m.role, "content": m.content} for m in messages],
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """A stored answer: what the backend returned for one key."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    finish_reason: str | None
    cost: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    finish_reason TEXT,
    cost REAL NOT NULL,
    created_at REAL NOT NULL
)
"""


class ResponseCache:
    """Answers by cache key, in the SQLite file ``path``.

    Example::

        cache = ResponseCache(workspace.cache_dir / "llm_cache.sqlite")
        cache.get(key)          # CachedAnswer or None
        cache.put(key, "openai", answer)
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._store = SQLiteStore(self.path, _SCHEMA)

    def get(self, key: str) -> CachedAnswer | None:
        row = (
            self._store.connection()
            .execute(
                "SELECT text, model, input_tokens, output_tokens, finish_reason, cost "
                "FROM answers WHERE key = ?",
                (key,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return CachedAnswer(
            text=row[0],
            model=row[1],
            input_tokens=row[2],
            output_tokens=row[3],
            finish_reason=row[4],
            cost=row[5],
        )

    def put(self, key: str, backend: str, answer: CachedAnswer) -> bool:
        """Store ``answer`` unless the key is already there; True when this call stored it."""
        cursor = self._store.connection().execute(
            "INSERT INTO answers (key, backend, model, text, input_tokens, output_tokens, "
            "finish_reason, cost, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(key) DO NOTHING",
            (
                key,
                backend,
                answer.model,
                answer.text,
                answer.input_tokens,
                answer.output_tokens,
                answer.finish_reason,
                answer.cost,
                time.time(),
            ),
        )
        return cursor.rowcount == 1

    def __len__(self) -> int:
        (count,) = self._store.connection().execute("SELECT COUNT(*) FROM answers").fetchone()
        return int(count)
