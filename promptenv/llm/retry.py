"""The retry policy: exponential backoff with jitter, honouring Retry-After.

Only ``TransientBackendError`` is retried (timeouts, connection errors, 429,
5xx, Anthropic's 529). The SDKs' own retries are off, so every attempt is
made, counted and recorded here.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry.

    Attempt ``n`` (1-based) that fails transiently waits
    ``min(max_delay_s, base_delay_s * 2 ** (n - 1))``, of which the fraction
    ``jitter`` is drawn at random, so concurrent clients do not retry in step.
    When the server sends Retry-After the wait is at least that long; if it
    asks for more than ``max_retry_after_s`` the call fails instead.
    """

    max_attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    jitter: float = 0.5
    max_retry_after_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("delays must be >= 0")

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """The wait after failed attempt ``attempt`` when the server gave no Retry-After."""
        delay = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return delay * (1.0 - self.jitter) + rng.uniform(0.0, delay * self.jitter)

    def wait_s(self, attempt: int, retry_after_s: float | None, rng: random.Random) -> float:
        """The wait before the next attempt: the backoff, but never less than Retry-After."""
        backoff = self.backoff_s(attempt, rng)
        return backoff if retry_after_s is None else max(backoff, retry_after_s)


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds asked by ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class JitterSource:
    """A thread-safe ``random.Random`` for jitter (seedable for tests)."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def wait_s(self, policy: RetryPolicy, attempt: int, retry_after: float | None) -> float:
        with self._lock:
            return policy.wait_s(attempt, retry_after, self._rng)
