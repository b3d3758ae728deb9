"""The errors of the LLM client. Each message says what to fix.

``LLMError`` is the base. When ``generate_many`` stops early it re-raises the
first error with ``error.batch`` set to what was finished (a ``BatchResult``),
and the message then ends with how many requests were answered and which are
left.
"""

from __future__ import annotations

from pipelines.errors import ConfigError, PMLMError
from promptenv.llm.types import BatchResult, Spend


class LLMError(PMLMError):
    """Base of every error raised by ``promptenv.llm``."""

    exit_code = 6

    batch: BatchResult | None = None

    def __str__(self) -> str:
        message = super().__str__()
        if self.batch is not None:
            return f"{message} [{self.batch.summary()}]"
        return message


class BackendSpecError(LLMError, ConfigError):
    """A backend spec string could not be parsed."""

    exit_code = ConfigError.exit_code


class BackendConfigError(LLMError, ConfigError):
    """A backend cannot be used as configured: missing key, file, package or price."""

    exit_code = ConfigError.exit_code


class PermanentBackendError(LLMError):
    """The backend rejected the request in a way a retry will not fix (400, 401, 403, 404...)."""

    exit_code = 8

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientBackendError(LLMError):
    """A failure worth retrying: timeout, connection error, 429, 5xx, 529.

    ``retry_after_s`` is the wait the server asked for, if it said.
    Backends raise it; the client retries it and, when attempts run out,
    raises ``RetriesExhausted``.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class RetriesExhausted(LLMError):
    """Every attempt failed transiently; ``last`` is the final failure."""

    def __init__(self, message: str, *, last: TransientBackendError, attempts: int) -> None:
        super().__init__(message)
        self.last = last
        self.attempts = attempts


class BudgetExceeded(LLMError):
    """A call was refused because it could exceed the run's hard budget.

    Raised before the call is made. ``spent`` is what the run had used,
    ``needed`` what the refused call could use at most.
    """

    exit_code = 7

    def __init__(self, message: str, *, spent: Spend, needed: Spend) -> None:
        super().__init__(message)
        self.spent = spent
        self.needed = needed


class PrivacyViolation(LLMError):
    """A prompt for a remote backend held direct identifiers and the policy is to refuse.

    ``kinds`` counts what was found per kind (e.g. ``{"DATE": 2}``); the
    identifiers themselves are never put in the message.
    """

    exit_code = 9

    def __init__(self, message: str, *, kinds: dict[str, int]) -> None:
        super().__init__(message)
        self.kinds = kinds
