"""The hard budget (calls, tokens, money) and the price table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from llm_stub_server import Action, StubLLMServer

from promptenv.llm import (
    BackendConfigError,
    Budget,
    BudgetExceeded,
    ClientConfig,
    GenerationParams,
    GenerationRequest,
    LLMClient,
    RetryPolicy,
)
from promptenv.llm.prices import DEFAULT_PRICES_PATH, PriceTable

PARAMS = GenerationParams(max_tokens=32)
REPO = Path(__file__).resolve().parents[2]


def client_for(
    stub: StubLLMServer, workspace: Path, retry: RetryPolicy, **kwargs: object
) -> LLMClient:
    return LLMClient(
        f"anthropic:claude-test@{stub.url}",
        workspace=workspace,
        config=ClientConfig(anthropic_api_key="k"),
        retry=retry,
        **kwargs,  # type: ignore[arg-type]
    )


def test_batch_over_budget_stops_cleanly_and_keeps_its_answers(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    requests = [GenerationRequest("s", f"patient {i}", PARAMS) for i in range(12)]
    client = client_for(stub, workspace, fast_retry, budget=Budget(max_calls=5))
    with pytest.raises(BudgetExceeded) as caught:
        client.generate_many(requests, concurrency=2)
    batch = caught.value.batch
    assert batch is not None
    assert (batch.total, batch.done, len(batch.pending)) == (12, 5, 7)
    message = str(caught.value)
    assert "max_calls=5" in message
    assert "5 of 12 requests answered" in message and "7 left" in message
    assert len(stub.requests) == 5  # refused before the sixth call, not after
    assert client.spent.calls == 5

    # the finished answers are cached: a rerun with more budget only computes the rest
    rerun = client_for(stub, workspace, fast_retry, budget=Budget(max_calls=7))
    completions = rerun.generate_many(requests, concurrency=2)
    assert len(completions) == 12
    assert sum(c.cached for c in completions) == 5
    assert len(stub.requests) == 12
    done_before = {i for i, c in enumerate(batch.completions) if c is not None}
    assert {i for i, c in enumerate(completions) if c.cached} == done_before


def test_token_budget_refuses_before_the_call(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    client = client_for(stub, workspace, fast_retry, budget=Budget(max_tokens=100))
    with pytest.raises(BudgetExceeded, match="max_tokens=100"):
        client.generate("s", "question", GenerationParams(max_tokens=200))
    assert stub.requests == []
    client.generate("s", "question", GenerationParams(max_tokens=20))  # fits: estimate + 20 <= 100
    assert len(stub.requests) == 1


def test_retries_count_as_calls(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    stub.script(Action(503), Action(503))
    client = client_for(stub, workspace, fast_retry, budget=Budget(max_calls=2))
    with pytest.raises(BudgetExceeded, match="max_calls=2"):
        client.generate("s", "question", PARAMS)
    assert len(stub.requests) == 2


def test_money_budget_uses_the_price_table(
    stub: StubLLMServer,
    workspace: Path,
    fast_retry: RetryPolicy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"anthropic": {"claude-test": {"input": 1000, "output": 2000}}}))
    monkeypatch.setenv("PMLM_PRICES", str(prices))
    client = client_for(stub, workspace, fast_retry, budget=Budget(max_cost=0.5))
    done = 0
    with pytest.raises(BudgetExceeded, match=r"max_cost=0\.5"):
        for i in range(100):
            completion = client.generate("s", f"question {i}", PARAMS)
            # the stub reports 40 tokens in, 6 out
            assert completion.cost == pytest.approx((40 * 1000 + 6 * 2000) / 1e6)
            done += 1
    assert done == len(stub.requests) >= 3
    rows = client.ledger.entries(client.run_id)
    assert sum(r.cost for r in rows) == pytest.approx(done * 0.052)
    assert sum(r.cost for r in rows) <= 0.5


def test_money_budget_needs_a_price(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    with pytest.raises(BackendConfigError, match="needs a price for anthropic:claude-test"):
        client_for(stub, workspace, fast_retry, budget=Budget(max_cost=1.0))


def test_a_resumed_run_keeps_its_spend(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    budget = Budget(max_calls=3)
    first = client_for(stub, workspace, fast_retry, budget=budget, run_id="nightly-1")
    for i in range(3):
        first.generate("s", f"q{i}", PARAMS)
    resumed = client_for(stub, workspace, fast_retry, budget=budget, run_id="nightly-1")
    assert resumed.spent.calls == 3
    assert resumed.generate("s", "q0", PARAMS).cached  # cache hits are free
    with pytest.raises(BudgetExceeded):
        resumed.generate("s", "q9", PARAMS)
    assert len(stub.requests) == 3


def test_zero_calls_means_no_call(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    client = client_for(stub, workspace, fast_retry, budget=Budget(max_calls=0))
    with pytest.raises(BudgetExceeded, match="max_calls=0"):
        client.generate("s", "question", PARAMS)
    assert stub.requests == []


# One process of `test_one_budget_holds_across_processes`: 8 distinct questions under
# the shared scope of $PMLM_BUDGET_SCOPE with at most 5 calls; prints how many it got.
WORKER = """
import sys
from promptenv.llm import Budget, BudgetExceeded, ClientConfig, GenerationParams, LLMClient
from promptenv.llm import RetryPolicy

url, workspace, name = sys.argv[1:4]
client = LLMClient(
    f"anthropic:claude-test@{url}", workspace=workspace, budget=Budget(max_calls=5),
    config=ClientConfig(anthropic_api_key="k"), retry=RetryPolicy(max_attempts=1),
)
answered = 0
for i in range(8):
    try:
        client.generate("s", f"{name} question {i}", GenerationParams(max_tokens=8))
        answered += 1
    except BudgetExceeded:
        pass
print(answered)
"""


def test_one_budget_holds_across_processes(stub: StubLLMServer, workspace: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PMLM_BUDGET_SCOPE": "nightly-job"}
    stub.script(*[Action(delay_s=0.3) for _ in range(5)])  # slow answers: the two overlap
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, stub.url, str(workspace), name],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("first", "second")
    ]
    answered = [int(w.communicate(timeout=120)[0]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    assert sum(answered) == 5 and len(stub.requests) == 5  # not 5 each
    ledger = client_for(stub, workspace, RetryPolicy()).ledger
    assert ledger.spend("nightly-job").calls == 5


def test_one_budget_holds_across_retries(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Prefect retry runs the task again in the same process: a new client, a new run
    id, the same scope (the CLI's $PMLM_BUDGET_SCOPE). The retries spend one budget."""
    monkeypatch.setenv("PMLM_BUDGET_SCOPE", "flow-run-7")
    calls = []
    for _attempt in range(3):  # the task's first run and two retries
        client = client_for(stub, workspace, fast_retry, budget=Budget(max_calls=4))
        with pytest.raises(BudgetExceeded):
            for i in range(10):
                client.generate("s", f"attempt {_attempt} question {i}", PARAMS)
        calls.append(len(stub.requests))
    assert calls == [4, 4, 4]
    assert client.spent.calls == 4


def test_a_killed_attempt_does_not_hold_the_budget(workspace: Path) -> None:
    """A hold whose process is gone is dropped; one whose process lives counts."""
    from promptenv.llm.ledger import Ledger
    from promptenv.llm.types import Spend

    ledger = Ledger(workspace / "ledger.sqlite")
    budget = Budget(max_calls=1)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    hold = ledger.hold("s", Spend(calls=1), budget.check)
    connection = ledger._store.connection()
    connection.execute("UPDATE holds SET pid = ? WHERE id = ?", (int(dead.stdout), hold))
    ledger.hold("s", Spend(calls=1), budget.check)  # the dead process's hold was dropped
    with pytest.raises(BudgetExceeded, match="max_calls=1"):
        ledger.hold("s", Spend(calls=1), budget.check)  # this process's hold counts


def test_default_prices_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = PriceTable.load()
    assert table.source == DEFAULT_PRICES_PATH
    assert table.cost("openai", "gpt-4o-mini", input_tokens=1000, output_tokens=500) == (
        pytest.approx(0.00045)
    )
    # longest prefix wins: a dated model name takes its family's price
    assert table.price("anthropic", "claude-sonnet-4-5-20250929") == table.price(
        "anthropic", "claude-sonnet-4-5"
    )
    assert table.price("openai", "unknown-model") is None
    assert table.cost("local", "anything", input_tokens=10**6, output_tokens=10**6) == 0.0

    custom = tmp_path / "prices.toml"
    custom.write_text('[openai]\n"gpt-4o-mini" = { input = 1.0, output = 3.0 }\n')
    monkeypatch.setenv("PMLM_PRICES", str(custom))
    assert (
        PriceTable.load().cost("openai", "gpt-4o-mini", input_tokens=10**6, output_tokens=0) == 1.0
    )

    custom.write_text('[openai]\n"gpt-4o-mini" = { input = 1.0 }\n')
    with pytest.raises(BackendConfigError, match="is malformed"):
        PriceTable.load()
    monkeypatch.setenv("PMLM_PRICES", str(tmp_path / "missing.toml"))
    with pytest.raises(BackendConfigError, match="cannot read the price table"):
        PriceTable.load()
