"""The backends behind the client, one module each, and the factory that picks one from a spec."""

from __future__ import annotations

from promptenv.llm.backends.base import Backend, BackendReply
from promptenv.llm.config import ClientConfig
from promptenv.llm.types import BackendSpec

__all__ = ["Backend", "BackendReply", "make_backend"]


def make_backend(spec: BackendSpec, config: ClientConfig) -> Backend:
    """Build the backend a parsed spec names (keys and URLs resolved from ``config`` or env).

    Raises ``BackendConfigError`` when something it needs is missing.
    """
    if spec.kind == "local":
        from promptenv.llm.backends.local import LocalBackend

        return LocalBackend(
            spec.model_path,
            n_ctx=config.local_n_ctx,
            n_threads=config.local_n_threads,
            parallel=config.local_parallel,
        )
    assert spec.model is not None  # parse_backend_spec guarantees it for remote kinds
    if spec.kind == "openai":
        from promptenv.llm.backends.openai_chat import OpenAIChatBackend

        return OpenAIChatBackend(spec.model, base_url=spec.base_url, config=config)
    from promptenv.llm.backends.anthropic_messages import AnthropicMessagesBackend

    return AnthropicMessagesBackend(spec.model, base_url=spec.base_url, config=config)
