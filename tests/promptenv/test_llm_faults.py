"""Remote backends against a local HTTP server: answers, retries, faults, errors, key hygiene."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import pytest
from llm_stub_server import FAULT_STATUSES, Action, StubLLMServer, answer_for

from promptenv.llm import (
    ClientConfig,
    GenerationParams,
    GenerationRequest,
    LLMClient,
    PermanentBackendError,
    RetriesExhausted,
    RetryPolicy,
)
from promptenv.llm.local_server import free_port

PARAMS = GenerationParams(max_tokens=32)


def anthropic_client(
    stub: StubLLMServer, workspace: Path, retry: RetryPolicy, **kwargs: object
) -> LLMClient:
    return LLMClient(
        f"anthropic:claude-test@{stub.url}",
        workspace=workspace,
        config=kwargs.pop("config", ClientConfig(anthropic_api_key="test-key")),  # type: ignore[arg-type]
        retry=retry,
        **kwargs,  # type: ignore[arg-type]
    )


def openai_client(stub: StubLLMServer, workspace: Path, retry: RetryPolicy) -> LLMClient:
    return LLMClient(
        f"openai:gpt-test@{stub.url}/v1",
        workspace=workspace,
        config=ClientConfig(openai_api_key="test-key"),
        retry=retry,
    )


def test_anthropic_messages_request_and_answer(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    client = anthropic_client(stub, workspace, fast_retry)
    completion = client.generate(
        "You are an obstetrician.", "What is due at 28 weeks?", GenerationParams(max_tokens=50)
    )
    assert completion.text == answer_for("What is due at 28 weeks?")
    assert (completion.backend, completion.model, completion.cached) == (
        "anthropic",
        "claude-test",
        False,
    )
    assert (completion.usage.input_tokens, completion.usage.output_tokens) == (40, 6)
    (request,) = stub.requests
    assert request.path == "/v1/messages"
    assert request.json["system"] == "You are an obstetrician."
    assert request.json["max_tokens"] == 50
    assert request.json["messages"] == [{"role": "user", "content": "What is due at 28 weeks?"}]
    (row,) = client.ledger.entries(client.run_id)
    assert (row.outcome, row.attempt, row.tokens_in, row.tokens_out) == ("ok", 1, 40, 6)
    assert row.endpoint == stub.url


def test_429_waits_at_least_retry_after_then_succeeds(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    stub.script(Action(429, headers={"retry-after": "1"}))
    client = anthropic_client(stub, workspace, fast_retry)
    started = time.perf_counter()
    completion = client.generate("", "question one", PARAMS)
    elapsed = time.perf_counter() - started
    assert completion.attempts == 2
    assert elapsed >= 1.0  # the backoff alone is < 0.02 s: only Retry-After explains the wait
    rows = client.ledger.entries(client.run_id)
    assert [(r.outcome, r.status, r.attempt) for r in rows] == [("retry", 429, 1), ("ok", None, 2)]
    assert rows[0].wait_s >= 1.0
    assert rows[0].error_kind == "RateLimitError"
    assert stub.responses == [429, 200]


def test_529_500_503_sequence_is_retried_and_counted(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    stub.script(Action(529), Action(500), Action(503))
    client = anthropic_client(stub, workspace, fast_retry)
    completion = client.generate("", "question two", PARAMS)
    assert completion.attempts == 4
    assert completion.text == answer_for("question two")
    rows = client.ledger.entries(client.run_id)
    assert [(r.outcome, r.status) for r in rows] == [
        ("retry", 529),
        ("retry", 500),
        ("retry", 503),
        ("ok", None),
    ]
    assert rows[0].error_kind == "OverloadedError"
    (summary,) = client.ledger.summary(client.run_id)
    assert (summary.calls, summary.attempts, summary.retries, summary.errors) == (1, 4, 3, 0)


def test_timeout_is_retried(stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy) -> None:
    stub.script(Action(200, delay_s=3.0))
    client = anthropic_client(
        stub, workspace, fast_retry, config=ClientConfig(anthropic_api_key="k", timeout_s=1.0)
    )
    completion = client.generate("", "slow question", PARAMS)
    assert completion.attempts == 2
    rows = client.ledger.entries(client.run_id)
    assert [(r.outcome, r.error_kind) for r in rows] == [("retry", "APITimeoutError"), ("ok", None)]
    assert 0.9 < rows[0].latency_s < 2.9


def test_retries_stop_after_max_attempts(stub: StubLLMServer, workspace: Path) -> None:
    stub.script(*[Action(503)] * 10)
    policy = RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.002)
    client = anthropic_client(stub, workspace, policy)
    with pytest.raises(RetriesExhausted, match="still failing after 3 attempts") as caught:
        client.generate("", "doomed", PARAMS)
    assert caught.value.attempts == 3
    assert len(stub.requests) == 3
    outcomes = [r.outcome for r in client.ledger.entries(client.run_id)]
    assert outcomes == ["retry", "retry", "error"]


def test_retry_after_longer_than_allowed_fails_at_once(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    stub.script(Action(429, headers={"retry-after": "3600"}))
    client = anthropic_client(stub, workspace, fast_retry)
    with pytest.raises(RetriesExhausted, match="asked to wait 3600 s"):
        client.generate("", "later", PARAMS)
    assert len(stub.requests) == 1


def test_unreachable_server_is_retried_then_explained(workspace: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = LLMClient(
        f"anthropic:claude-test@{url}",
        workspace=workspace,
        config=ClientConfig(anthropic_api_key="k", timeout_s=2),
        retry=RetryPolicy(max_attempts=2, base_delay_s=0.001),
    )
    with pytest.raises(RetriesExhausted, match="is the server running"):
        client.generate("", "anyone there?", PARAMS)
    assert [r.error_kind for r in client.ledger.entries(client.run_id)] == [
        "APIConnectionError",
        "APIConnectionError",
    ]


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
@pytest.mark.parametrize(
    ("status", "hint"),
    [
        (400, "the request was rejected"),
        (401, "check {key} (the key was missing, wrong or revoked)"),
        (403, "check its permissions"),
        (404, "check the model name in the backend spec and the base URL"),
    ],
)
def test_permanent_errors_fail_at_once_and_say_what_to_fix(
    stub: StubLLMServer,
    workspace: Path,
    fast_retry: RetryPolicy,
    kind: str,
    status: int,
    hint: str,
) -> None:
    stub.script(Action(status), Action(status))
    if kind == "anthropic":
        client, key, url = (
            anthropic_client(stub, workspace, fast_retry),
            "ANTHROPIC_API_KEY",
            stub.url,
        )
    else:
        client, key, url = (
            openai_client(stub, workspace, fast_retry),
            "OPENAI_API_KEY",
            f"{stub.url}/v1",
        )
    with pytest.raises(PermanentBackendError) as caught:
        client.generate("", "question", PARAMS)
    message = str(caught.value)
    assert message.startswith(f"{status} from {kind} at {url}: ")
    assert hint.format(key=key) in message
    assert caught.value.status == status
    assert len(stub.requests) == 1  # no retry
    (row,) = client.ledger.entries(client.run_id)
    assert (row.outcome, row.status) == ("error", status)


def _failures_before(successes: int, rate: float, seed: int) -> int:
    """Replay the stub's seeded fault draws: failures before the ``successes``-th success."""
    rng, failures, done = random.Random(seed), 0, 0
    while done < successes:
        if rng.random() < rate:
            rng.choice(FAULT_STATUSES)
            failures += 1
        else:
            done += 1
    return failures


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_thirty_percent_transient_faults_every_answer_arrives(
    stub: StubLLMServer, workspace: Path, kind: str
) -> None:
    n, seed = 40, 11
    stub.inject_faults(rate=0.3, seed=seed)
    policy = RetryPolicy(max_attempts=10, base_delay_s=0.002, max_delay_s=0.01)
    client = (
        anthropic_client(stub, workspace, policy)
        if kind == "anthropic"
        else openai_client(stub, workspace, policy)
    )
    questions = [f"patient {i}: what is next?" for i in range(n)]
    completions = client.generate_many(
        [GenerationRequest("Be brief.", q, PARAMS) for q in questions], concurrency=4
    )
    assert [c.text for c in completions] == [answer_for(q) for q in questions]
    expected_failures = _failures_before(n, 0.3, seed)
    assert expected_failures >= 8  # the seed gives a real fault load (about 30 %)
    assert stub.failures == expected_failures
    rows = client.ledger.entries(client.run_id)
    assert sum(r.outcome == "retry" for r in rows) == expected_failures
    assert sum(r.outcome == "ok" for r in rows) == n
    assert sum(c.attempts for c in completions) == n + expected_failures
    (summary,) = client.ledger.summary(client.run_id)
    assert (summary.calls, summary.retries, summary.attempts) == (n, expected_failures, len(rows))


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_api_keys_never_reach_logs_cache_ledger_or_errors(
    stub: StubLLMServer,
    workspace: Path,
    fast_retry: RetryPolicy,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "sk-test-5EcR3t-9f8e7d6c5b4a3210"
    monkeypatch.setenv("ANTHROPIC_API_KEY" if kind == "anthropic" else "OPENAI_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    spec = (
        f"anthropic:claude-test@{stub.url}"
        if kind == "anthropic"
        else f"openai:gpt-test@{stub.url}/v1"
    )
    client = LLMClient(spec, workspace=workspace, retry=fast_retry)
    stub.script(Action(429), Action(200))
    client.generate("sys", "first question", PARAMS)
    client.generate("sys", "first question", PARAMS)  # cache hit
    stub.script(Action(401))
    with pytest.raises(PermanentBackendError) as caught:
        client.generate("sys", "second question", PARAMS)

    sent = [
        r.headers.get("x-api-key", "") + r.headers.get("authorization", "") for r in stub.requests
    ]
    assert all(
        secret in header for header in sent
    )  # the key was used: the check below means something
    assert secret not in str(caught.value)
    assert secret not in caplog.text
    assert "attempt 1/6 failed" in caplog.text  # the retry was logged, and checked
    files = list((workspace / "cache").iterdir())
    assert {f.name for f in files} >= {"llm_cache.sqlite", "llm_ledger.sqlite"}
    for path in files:
        assert secret.encode() not in path.read_bytes(), path.name
    assert secret not in repr(client.config) and secret not in repr(client)
