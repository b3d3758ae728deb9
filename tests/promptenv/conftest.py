"""Fixtures for the LLM client tests: a clean environment, a workspace, the stub
server, fast retries, and the real llama.cpp OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_stub_server import StubLLMServer

from promptenv.llm import RetryPolicy
from promptenv.llm.local_server import LocalServer, missing_server_packages, start_local_server

LLM_ENV = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_PROFILE",
    "ANTHROPIC_CUSTOM_HEADERS",
    "PMLM_PRICES",
    "PMLM_WORKSPACE",
)


@pytest.fixture(autouse=True)
def clean_llm_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's keys, URLs or config directories."""
    for name in LLM_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "anthropic-config"))


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path / "ws"


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    with StubLLMServer() as server:
        yield server


@pytest.fixture
def fast_retry() -> RetryPolicy:
    return RetryPolicy(max_attempts=6, base_delay_s=0.005, max_delay_s=0.02, jitter=0.5)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """llama.cpp's own OpenAI-compatible server on the packaged SmolLM2, on a free port."""
    missing = missing_server_packages()
    if missing:
        pytest.fail(
            "the OpenAI-backend tests need llama-cpp-python's server extras, which are not "
            f"installed: pip install {' '.join(missing)} (and add them to pyproject.toml)",
            pytrace=False,
        )
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    server = start_local_server(log_path=log, n_ctx=2048, startup_timeout_s=90)
    try:
        yield server
    finally:
        server.stop()
