"""The ``openai`` backend: Chat Completions through the official ``openai`` SDK.

Works with OpenAI and with any OpenAI-compatible server (llama.cpp's server,
vLLM, a gateway): ``openai:MODEL@http://127.0.0.1:8080/v1``. The SDK's own
retries are off (``max_retries=0``): the client's retry policy counts every
attempt.

The length limit is sent as ``max_completion_tokens`` to api.openai.com (its
newer models reject ``max_tokens``) and as ``max_tokens`` elsewhere, which is
what compatible servers read. ``GenerationParams.extras`` go into the request
body as they are (e.g. ``{"repeat_penalty": 1.3}`` for llama.cpp's server).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import openai

from promptenv.llm.backends.base import BackendReply, classify_status
from promptenv.llm.config import ClientConfig, public_endpoint
from promptenv.llm.errors import BackendConfigError, TransientBackendError
from promptenv.llm.types import ChatMessage, GenerationParams

DEFAULT_BASE_URL = "https://api.openai.com/v1"
KEY_ENV = "OPENAI_API_KEY"
#: Sent when a self-hosted server needs no key (the SDK insists on one).
NO_KEY = "no-key-needed"


class OpenAIChatBackend:
    """One model behind an OpenAI-compatible Chat Completions endpoint."""

    kind: Literal["openai"] = "openai"
    is_local = False

    def __init__(self, model: str, *, base_url: str | None, config: ClientConfig) -> None:
        self.model = model
        url = (
            base_url
            or config.openai_base_url
            or os.environ.get("OPENAI_BASE_URL")
            or DEFAULT_BASE_URL
        ).rstrip("/")
        # the public form (no credentials) is what messages, ledger and cache key show
        self.endpoint = public_endpoint(url)
        self._official = urlsplit(url).hostname == "api.openai.com"
        api_key = config.openai_api_key or os.environ.get(KEY_ENV)
        if not api_key:
            if self._official:
                raise BackendConfigError(
                    f"openai:{model} needs an API key: set {KEY_ENV} "
                    "(or ClientConfig(openai_api_key=...))"
                )
            api_key = NO_KEY
        self._client = openai.OpenAI(
            api_key=api_key, base_url=url, timeout=config.timeout_s, max_retries=0
        )

    @property
    def identity(self) -> Mapping[str, object]:
        return {"kind": "openai", "endpoint": self.endpoint}

    def complete(self, messages: Sequence[ChatMessage], params: GenerationParams) -> BackendReply:
        """One Chat Completions request; SDK errors become Transient/PermanentBackendError."""
        body: dict[str, Any] = dict(params.extras)
        body["max_completion_tokens" if self._official else "max_tokens"] = params.max_tokens
        try:
            response = self._client.chat.completions.create(
                model=self.model,
                messages=[{"role": m.role, "content": m.content} for m in messages],  # type: ignore[misc]
                temperature=params.temperature,
                seed=params.seed if params.seed is not None else openai.omit,
                stop=list(params.stop) if params.stop else openai.omit,
                extra_body=body,
            )
        except openai.APITimeoutError as exc:
            raise TransientBackendError(f"timeout from openai at {self.endpoint}") from exc
        except openai.APIConnectionError as exc:
            raise TransientBackendError(
                f"cannot connect to openai at {self.endpoint} ({exc.__cause__ or exc}); "
                "is the server running and the URL right?"
            ) from exc
        except openai.APIStatusError as exc:
            raise classify_status(
                exc.status_code,
                backend="openai",
                url=self.endpoint,
                model=self.model,
                key_env=KEY_ENV,
                headers=exc.response.headers,
                detail=exc.message,
            ) from exc
        choice = response.choices[0]
        usage = response.usage
        return BackendReply(
            text=choice.message.content or "",
            model=response.model or self.model,
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            finish_reason=choice.finish_reason,
        )
