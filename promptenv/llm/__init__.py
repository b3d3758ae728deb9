"""The one LLM client of PMLM: local llama.cpp, OpenAI-compatible and Anthropic backends.

Every call goes through a privacy guard, a persistent cache, retries, a
ledger and a hard budget. Start with ``LLMClient`` (or ``generate``)::

    from promptenv.llm import GenerationParams, LLMClient

    client = LLMClient("local", workspace="pmlm-workspace")
    completion = client.generate("You are a concise obstetrician.",
                                 "What is checked at a 28-week visit?",
                                 GenerationParams(max_tokens=64))
    print(completion.text, completion.usage, completion.cached)
"""

from promptenv.llm.budget import Budget
from promptenv.llm.client import LLMClient, generate, new_run_id, workspace_paths
from promptenv.llm.config import ClientConfig
from promptenv.llm.errors import (
    BackendConfigError,
    BackendSpecError,
    BudgetExceeded,
    LLMError,
    PermanentBackendError,
    PrivacyViolation,
    RetriesExhausted,
    TransientBackendError,
)
from promptenv.llm.ledger import Ledger, LedgerEntry, LedgerSummary
from promptenv.llm.privacy import IdentifierDetector, PrivacyPolicy
from promptenv.llm.retry import RetryPolicy
from promptenv.llm.spec import parse_backend_spec
from promptenv.llm.types import (
    BackendSpec,
    BatchResult,
    CacheStats,
    ChatMessage,
    Completion,
    GenerationParams,
    GenerationRequest,
    KnownIdentifiers,
    Spend,
    TokenUsage,
)

__all__ = [
    "BackendConfigError",
    "BackendSpec",
    "BackendSpecError",
    "BatchResult",
    "Budget",
    "BudgetExceeded",
    "CacheStats",
    "ChatMessage",
    "ClientConfig",
    "Completion",
    "GenerationParams",
    "GenerationRequest",
    "IdentifierDetector",
    "KnownIdentifiers",
    "LLMClient",
    "LLMError",
    "Ledger",
    "LedgerEntry",
    "LedgerSummary",
    "PermanentBackendError",
    "PrivacyPolicy",
    "PrivacyViolation",
    "RetriesExhausted",
    "RetryPolicy",
    "Spend",
    "TokenUsage",
    "TransientBackendError",
    "generate",
    "new_run_id",
    "parse_backend_spec",
    "workspace_paths",
]
