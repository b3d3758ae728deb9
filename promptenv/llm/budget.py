"""The hard budget of a run: max backend calls, max tokens, max money.

Before each backend attempt the client reserves the most that attempt can use
(one call; the estimated input tokens plus ``max_tokens``; their price) and
``BudgetExceeded`` is raised if that could cross a limit, so the limit is never
overshot by a call that was allowed to start. After the attempt the
reservation is replaced by what was actually used. Cache hits are free.
``max_calls=0`` allows no call at all.

The ledger is the source of truth. A budget covers one *scope*: every client
with the same scope, in any thread, process or Dask worker using the same
workspace, and every Prefect retry, shares it. Reservations are rows of the
ledger's ``holds`` table, taken in one SQLite write transaction with the check,
and each is deleted in the transaction that records its attempt; so two
processes cannot both take the last call. A hold left by a killed process is
dropped once its process is gone (same host) or after ``HOLD_TTL_S``.

The scope is ``Budget.scope``, else ``$PMLM_BUDGET_SCOPE`` (``pmlm`` sets it
once per command unless it is set, so the command's Prefect retries and the
workers it starts share one budget), else the run
id (a client that reuses a run id starts from what the ledger holds for it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from promptenv.llm.errors import BudgetExceeded
from promptenv.llm.types import Spend

if TYPE_CHECKING:
    from promptenv.llm.ledger import Ledger

#: The environment variable naming the budget scope of every client of this process.
SCOPE_ENV = "PMLM_BUDGET_SCOPE"


@dataclass(frozen=True)
class Budget:
    """Limits for one scope; ``None`` means no limit, ``0`` no use at all.

    ``max_calls`` counts backend attempts (each retry is a call),
    ``max_tokens`` input plus output tokens, ``max_cost`` money in the price
    table's currency. ``scope``: the budget shared with every client of the
    same scope (see the module docstring; default ``$PMLM_BUDGET_SCOPE`` or the
    run id).
    """

    max_calls: int | None = None
    max_tokens: int | None = None
    max_cost: float | None = None
    scope: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_calls", "max_tokens", "max_cost"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.max_calls, self.max_tokens, self.max_cost))

    def scope_for(self, run_id: str) -> str:
        """The scope this budget covers for a client of run ``run_id``."""
        return self.scope or os.environ.get(SCOPE_ENV) or run_id

    def check(self, committed: Spend, needed: Spend) -> None:
        """Raise ``BudgetExceeded`` when ``needed`` on top of ``committed`` crosses a limit."""
        after = committed + needed
        over = []
        if self.max_calls is not None and after.calls > self.max_calls:
            over.append(f"max_calls={self.max_calls} (used {committed.calls})")
        if self.max_tokens is not None and after.tokens > self.max_tokens:
            over.append(
                f"max_tokens={self.max_tokens} (used {committed.tokens}, "
                f"this call could use {needed.tokens})"
            )
        if self.max_cost is not None and after.cost > self.max_cost:
            over.append(
                f"max_cost={self.max_cost:g} (used {committed.cost:.6f}, "
                f"this call could cost {needed.cost:.6f})"
            )
        if over:
            raise BudgetExceeded(
                "budget exceeded, call not made: " + "; ".join(over) + ". Raise the limit or "
                "lower max_tokens to continue",
                spent=committed,
                needed=needed,
            )


class BudgetTracker:
    """One client's view of its scope's budget; the ledger holds the accounts."""

    def __init__(self, budget: Budget, ledger: Ledger, scope: str) -> None:
        self.budget = budget
        self.ledger = ledger
        self.scope = scope

    @property
    def spent(self) -> Spend:
        """What the scope has used so far (every process's attempts)."""
        return self.ledger.spend(self.scope)

    def reserve(self, needed: Spend) -> int | None:
        """Hold ``needed`` against the budget, or raise ``BudgetExceeded`` holding nothing.

        Returns the hold's id, which the ledger row of the attempt releases
        (``Ledger.record(entry, hold=...)``); None when nothing is limited.
        """
        if not self.budget.limited:
            return None
        return self.ledger.hold(self.scope, needed, self.budget.check)
