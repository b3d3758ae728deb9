"""The contract every backend fulfils, and the HTTP error classification they share.

A backend turns chat messages and ``GenerationParams`` into a
``BackendReply`` for one attempt. It never retries, caches or counts: it
raises ``TransientBackendError`` for what is worth retrying and
``PermanentBackendError`` (with what to fix) for what is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from promptenv.llm.errors import PermanentBackendError, TransientBackendError
from promptenv.llm.retry import retry_after_s
from promptenv.llm.types import BackendKind, ChatMessage, GenerationParams

#: Statuses retried: request timeout, conflict, rate limit, server errors, Anthropic overload.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class BackendReply:
    """What one successful attempt returned."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    finish_reason: str | None


class Backend(Protocol):
    """One LLM endpoint.

    ``kind``: local, openai or anthropic. ``model``: the model asked for.
    ``endpoint``: the base URL (remote) or the GGUF path (local), for the
    ledger. ``is_local``: True when the data never leaves the machine.
    ``identity``: what, besides the model, decides the answer (for the cache
    key); never a secret.
    """

    @property
    def kind(self) -> BackendKind: ...

    @property
    def model(self) -> str: ...

    @property
    def endpoint(self) -> str: ...

    @property
    def is_local(self) -> bool: ...

    @property
    def identity(self) -> Mapping[str, object]: ...

    def complete(self, messages: Sequence[ChatMessage], params: GenerationParams) -> BackendReply:
        """Make one attempt; raise Transient/PermanentBackendError on failure."""
        ...


def classify_status(
    status: int,
    *,
    backend: str,
    url: str,
    model: str,
    key_env: str,
    headers: Mapping[str, str] | None,
    detail: str,
) -> TransientBackendError | PermanentBackendError:
    """Turn an HTTP error status into our error, with a message that says what to fix.

    ``detail`` is the server's own message (shortened); ``headers`` the
    response headers (for Retry-After).
    """
    where = f"{status} from {backend} at {url}"
    short = detail.strip().replace("\n", " ")[:300]
    if status in TRANSIENT_STATUSES or status >= 500:
        wait = retry_after_s(headers)
        reason = {429: "rate limited", 529: "overloaded"}.get(status, "server error")
        return TransientBackendError(f"{where}: {reason}", status=status, retry_after_s=wait)
    hints = {
        400: "the request was rejected; check the generation params and extras, and that the "
        "prompt fits the model's context",
        401: f"check {key_env} (the key was missing, wrong or revoked)",
        402: f"the account behind {key_env} has no credit left",
        403: f"the key in {key_env} may not use model {model!r}; check its permissions",
        404: f"model {model!r} or the endpoint was not found; check the model name in the "
        "backend spec and the base URL",
        413: "the prompt is too large for this endpoint; shorten it",
        422: "the request was rejected; check the generation params and extras",
    }
    hint = hints.get(status, "the request was rejected and a retry will not help")
    return PermanentBackendError(
        f"{where}: {hint}" + (f" (server said: {short})" if short else ""), status=status
    )
