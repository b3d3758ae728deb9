"""The hard budget of a run: max backend calls, max tokens, max money.

Before each backend attempt the client reserves the most that attempt can use
(one call; the estimated input tokens plus ``max_tokens``; their price) and
``BudgetExceeded`` is raised if that could cross a limit, so the limit is never
overshot by a call that was allowed to start. After the attempt the
reservation is settled to what was actually used. Cache hits are free.

The budget covers one run id: a client that reuses a run id starts from what
the ledger already holds for it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from promptenv.llm.errors import BudgetExceeded
from promptenv.llm.types import Spend


@dataclass(frozen=True)
class Budget:
    """Limits for one run; ``None`` means no limit.

    ``max_calls`` counts backend attempts (each retry is a call),
    ``max_tokens`` input plus output tokens, ``max_cost`` money in the price
    table's currency.
    """

    max_calls: int | None = None
    max_tokens: int | None = None
    max_cost: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_calls", "max_tokens", "max_cost"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.max_calls, self.max_tokens, self.max_cost))


class BudgetTracker:
    """Thread-safe accounting of one run against its ``Budget``."""

    def __init__(self, budget: Budget, already_spent: Spend | None = None) -> None:
        self.budget = budget
        self._spent = already_spent or Spend()
        self._reserved = Spend()
        self._lock = threading.Lock()

    @property
    def spent(self) -> Spend:
        with self._lock:
            return self._spent

    def reserve(self, needed: Spend) -> Spend:
        """Hold ``needed`` against the budget or raise ``BudgetExceeded`` without holding anything."""
        with self._lock:
            committed = self._spent + self._reserved
            after = committed + needed
            budget = self.budget
            over = []
            if budget.max_calls is not None and after.calls > budget.max_calls:
                over.append(f"max_calls={budget.max_calls} (used {committed.calls})")
            if budget.max_tokens is not None and after.tokens > budget.max_tokens:
                over.append(
                    f"max_tokens={budget.max_tokens} (used {committed.tokens}, "
                    f"this call could use {needed.tokens})"
                )
            if budget.max_cost is not None and after.cost > budget.max_cost:
                over.append(
                    f"max_cost={budget.max_cost:g} (used {committed.cost:.6f}, "
                    f"this call could cost {needed.cost:.6f})"
                )
            if over:
                raise BudgetExceeded(
                    "budget exceeded, call not made: " + "; ".join(over) + ". Raise the limit or "
                    "lower max_tokens to continue",
                    spent=committed,
                    needed=needed,
                )
            self._reserved = self._reserved + needed
            return needed

    def settle(self, reservation: Spend, actual: Spend) -> None:
        """Replace a reservation by what the attempt actually used."""
        with self._lock:
            self._reserved = self._reserved - reservation
            self._spent = self._spent + actual
