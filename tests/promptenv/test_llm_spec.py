"""Backend spec strings: every accepted form parses, and bad ones say what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptenv.llm import BackendSpec, BackendSpecError, parse_backend_spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("local", BackendSpec(kind="local")),
        (
            "local:/models/other.gguf",
            BackendSpec(kind="local", model="other", model_path=Path("/models/other.gguf")),
        ),
        ("openai:gpt-4o-mini", BackendSpec(kind="openai", model="gpt-4o-mini")),
        (
            "openai:smollm2@http://127.0.0.1:8080/v1/",
            BackendSpec(kind="openai", model="smollm2", base_url="http://127.0.0.1:8080/v1"),
        ),
        (
            "openai:ft:gpt-4o-mini:acme:abc123@https://gw.example/v1",
            BackendSpec(
                kind="openai", model="ft:gpt-4o-mini:acme:abc123", base_url="https://gw.example/v1"
            ),
        ),
        ("anthropic:claude-sonnet-4-5", BackendSpec(kind="anthropic", model="claude-sonnet-4-5")),
        (
            "anthropic:claude-x@http://localhost:9000",
            BackendSpec(kind="anthropic", model="claude-x", base_url="http://localhost:9000"),
        ),
        (" Anthropic:claude-x ", BackendSpec(kind="anthropic", model="claude-x")),
        # LiteLLM's and DSPy's provider/model form
        ("openai/gpt-4o-mini", BackendSpec(kind="openai", model="gpt-4o-mini")),
        ("anthropic/claude-sonnet-4-5", BackendSpec(kind="anthropic", model="claude-sonnet-4-5")),
        (
            "openai/meta-llama/Llama-3.1-8B@http://127.0.0.1:8000/v1",
            BackendSpec(
                kind="openai", model="meta-llama/Llama-3.1-8B", base_url="http://127.0.0.1:8000/v1"
            ),
        ),
        (
            "OpenAI/ft:gpt-4o-mini:acme:abc123",
            BackendSpec(kind="openai", model="ft:gpt-4o-mini:acme:abc123"),
        ),
    ],
)
def test_accepted_forms(text: str, expected: BackendSpec) -> None:
    assert parse_backend_spec(text) == expected


def test_spec_round_trips_through_str() -> None:
    for text in ("local", "openai:m@http://h:1/v1", "anthropic:claude-x"):
        assert str(parse_backend_spec(text)) == text
    # the slash form names the same backend (and so shares its cache)
    assert str(parse_backend_spec("openai/m@http://h:1/v1")) == "openai:m@http://h:1/v1"
    assert str(parse_backend_spec("anthropic/claude-x")) == "anthropic:claude-x"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("gemini:pro", "unknown backend 'gemini'"),
        ("openai", "needs a model name"),
        ("openai:", "needs a model name"),
        ("openai/", "needs a model name: openai:MODEL or openai/MODEL"),
        ("anthropic/claude x", "no spaces"),
        ("local/model.gguf", "unknown backend 'local/model.gguf'"),
        ("anthropic:claude x", "no spaces"),
        ("openai:gpt@ftp://host", "must start with http"),
        ("local:", "needs a path"),
        ("local:/models/weights.bin", "must be a .gguf file"),
    ],
)
def test_bad_specs_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(BackendSpecError) as caught:
        parse_backend_spec(text)
    message = str(caught.value)
    assert why in message
    assert "openai:MODEL@http://HOST:PORT/v1" in message  # lists the accepted forms
    assert isinstance(caught.value, ValueError)
