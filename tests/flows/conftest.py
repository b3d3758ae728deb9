"""Fixtures of the flow tests: one Prefect test server per session, one built workspace,
the stub LLM server."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def stub_llm_server() -> Any:
    """``StubLLMServer`` of tests/promptenv/llm_stub_server.py (an OpenAI-compatible
    test server; that folder is not importable from the flow tests)."""
    path = Path(__file__).parents[1] / "promptenv" / "llm_stub_server.py"
    spec = importlib.util.spec_from_file_location("llm_stub_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("llm_stub_server", module)
    spec.loader.exec_module(module)
    return module.StubLLMServer


@pytest.fixture
def echo_llm(
    stub_llm_server: Any, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], AbstractContextManager[tuple[Any, str]]]:
    """``with echo_llm() as (stub, backend):`` runs the echoing stub LLM server for the block
    (it stops at the block's end, so a command after it can show that it needs no LLM);
    ``backend`` is the ``--backend`` that reaches it. The stub's API key is set and
    $OPENAI_BASE_URL unset for the test."""
    monkeypatch.setenv("OPENAI_API_KEY", "stub-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)

    @contextmanager
    def running() -> Iterator[tuple[Any, str]]:
        stub = stub_llm_server(echo=True).start()
        try:
            yield stub, f"openai:stub-model@{stub.url}/v1"
        finally:
            stub.stop()

    return running


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A temporary Prefect server and database for the whole session; yields its API URL.

    Started once (~20 s on a loaded 2-core machine): every flow test shares it.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def built_workspace(
    prefect_server: str,
    made_once: Callable[[str], AbstractContextManager[tuple[Path, bool]]],
) -> Path:
    """The build flow run once on the default cohort (quick grids, ~1 min), shared by the
    pytest-xdist workers. Read-only: copy it."""
    from flows.pipeline import build

    with made_once("built") as (folder, made_before):
        root = folder / "ws"
        if not made_before:
            outcome = build(workspace=str(root))
            assert outcome.prompts is not None
            assert outcome.prompts.recomputed_patients == outcome.prompts.patients > 0
    return root
