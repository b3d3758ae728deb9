"""The ``anthropic`` backend: the Messages API through the official ``anthropic`` SDK.

``anthropic:MODEL`` (key from ``ANTHROPIC_API_KEY``, URL from
``ANTHROPIC_BASE_URL`` or the default) or ``anthropic:MODEL@http://host:port``.
The SDK's own retries are off (``max_retries=0``).

The system text goes into ``system``, stop sequences into ``stop_sequences``.
The Messages API of this SDK takes no ``seed`` and no ``temperature``; both
stay in the cache key but are not sent. ``GenerationParams.extras`` go into
the request body as they are (e.g. ``{"top_k": 5}``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import anthropic

from promptenv.llm.backends.base import BackendReply, classify_status
from promptenv.llm.config import ClientConfig, public_endpoint
from promptenv.llm.errors import BackendConfigError, TransientBackendError
from promptenv.llm.types import ChatMessage, GenerationParams

DEFAULT_BASE_URL = "https://api.anthropic.com"
KEY_ENV = "ANTHROPIC_API_KEY"
NO_KEY = "no-key-needed"


class AnthropicMessagesBackend:
    """One Claude model (or a compatible server) behind the Messages API."""

    kind: Literal["anthropic"] = "anthropic"
    is_local = False

    def __init__(self, model: str, *, base_url: str | None, config: ClientConfig) -> None:
        self.model = model
        url = (
            base_url
            or config.anthropic_base_url
            or os.environ.get("ANTHROPIC_BASE_URL")
            or DEFAULT_BASE_URL
        ).rstrip("/")
        # the public form (no credentials) is what messages, ledger and cache key show
        self.endpoint = public_endpoint(url)
        api_key = config.anthropic_api_key or os.environ.get(KEY_ENV)
        if not api_key:
            if url == DEFAULT_BASE_URL:
                raise BackendConfigError(
                    f"anthropic:{model} needs an API key: set {KEY_ENV} "
                    "(or ClientConfig(anthropic_api_key=...))"
                )
            api_key = NO_KEY
        # An explicit key stops the SDK from looking for profiles or federation settings.
        self._client = anthropic.Anthropic(
            api_key=api_key, base_url=url, timeout=config.timeout_s, max_retries=0
        )

    @property
    def identity(self) -> Mapping[str, object]:
        return {"kind": "anthropic", "endpoint": self.endpoint}

    def complete(self, messages: Sequence[ChatMessage], params: GenerationParams) -> BackendReply:
        """One Messages request; SDK errors become Transient/PermanentBackendError."""
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        turns: list[Any] = [
            {"role": m.role, "content": m.content} for m in messages if m.role != "system"
        ]
        try:
            response = self._client.messages.create(
                model=self.model,
                max_tokens=params.max_tokens,
                messages=turns,
                system=system if system else anthropic.omit,
                stop_sequences=list(params.stop) if params.stop else anthropic.omit,
                extra_body=dict(params.extras) or None,
            )
        except anthropic.APITimeoutError as exc:
            raise TransientBackendError(f"timeout from anthropic at {self.endpoint}") from exc
        except anthropic.APIConnectionError as exc:
            raise TransientBackendError(
                f"cannot connect to anthropic at {self.endpoint} ({exc.__cause__ or exc}); "
                "is the server running and the URL right?"
            ) from exc
        except anthropic.APIStatusError as exc:
            raise classify_status(
                exc.status_code,
                backend="anthropic",
                url=self.endpoint,
                model=self.model,
                key_env=KEY_ENV,
                headers=exc.response.headers,
                detail=exc.api_message or exc.message,
            ) from exc
        text = "".join(block.text for block in response.content if block.type == "text")
        return BackendReply(
            text=text,
            model=response.model or self.model,
            input_tokens=response.usage.input_tokens,
            output_tokens=response.usage.output_tokens,
            finish_reason=response.stop_reason,
        )
