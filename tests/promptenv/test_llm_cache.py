"""The answer cache: keys, hits and misses, persistence, single flight, concurrent processes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

from llm_stub_server import Action, StubLLMServer, answer_for

from promptenv.llm import (
    ClientConfig,
    GenerationParams,
    GenerationRequest,
    Ledger,
    LLMClient,
    RetryPolicy,
)
from promptenv.llm.cache import ResponseCache, cache_key
from promptenv.llm.types import ChatMessage

PARAMS = GenerationParams(max_tokens=32)
REPO = Path(__file__).resolve().parents[2]


def client_for(
    stub: StubLLMServer, workspace: Path, retry: RetryPolicy, **kwargs: object
) -> LLMClient:
    return LLMClient(
        f"anthropic:claude-test@{stub.url}",
        workspace=workspace,
        config=kwargs.pop("config", ClientConfig(anthropic_api_key="k")),  # type: ignore[arg-type]
        retry=retry,
        **kwargs,  # type: ignore[arg-type]
    )


def test_key_changes_with_every_input_and_only_with_them() -> None:
    backend = {"kind": "openai", "endpoint": "http://a/v1"}
    messages = [ChatMessage("system", "s"), ChatMessage("user", "u")]
    params = GenerationParams(max_tokens=10, temperature=0.0, seed=1, stop=("x",), extras={"a": 1})
    base = cache_key(backend, "m", params, messages)
    assert base == cache_key(dict(reversed(backend.items())), "m", replace(params), list(messages))
    variants = [
        cache_key({**backend, "endpoint": "http://b/v1"}, "m", params, messages),
        cache_key(backend, "m2", params, messages),
        cache_key(backend, "m", replace(params, max_tokens=11), messages),
        cache_key(backend, "m", replace(params, temperature=0.5), messages),
        cache_key(backend, "m", replace(params, seed=2), messages),
        cache_key(backend, "m", replace(params, stop=("y",)), messages),
        cache_key(backend, "m", replace(params, extras={"a": 2}), messages),
        cache_key(backend, "m", params, [ChatMessage("system", "s"), ChatMessage("user", "u ")]),
        cache_key(backend, "m", params, [ChatMessage("user", "s"), ChatMessage("user", "u")]),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_hits_and_misses_are_counted(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    client = client_for(stub, workspace, fast_retry)
    first = client.generate("s", "question A", PARAMS)
    again = client.generate("s", "question A", PARAMS)
    other = client.generate("s", "question B", PARAMS)
    assert (first.cached, again.cached, other.cached) == (False, True, False)
    assert again.text == first.text and again.cost == 0.0 and again.attempts == 0
    stats = client.cache_stats
    assert (stats.hits, stats.misses) == (1, 2)
    assert abs(stats.hit_rate - 1 / 3) < 1e-9
    assert len(stub.requests) == 2
    rows = client.ledger.entries(client.run_id)
    assert [(r.outcome, r.cached) for r in rows] == [
        ("ok", False),
        ("cache_hit", True),
        ("ok", False),
    ]
    (summary,) = client.ledger.summary(client.run_id)
    assert (summary.calls, summary.cache_hits, summary.attempts) == (3, 1, 2)


def test_a_restarted_run_reuses_every_answer(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    requests = [GenerationRequest("s", f"patient {i}", PARAMS) for i in range(6)]
    first = client_for(stub, workspace, fast_retry).generate_many(requests, concurrency=3)
    assert len(stub.requests) == 6
    restarted = client_for(
        stub, workspace, fast_retry, config=ClientConfig(anthropic_api_key="other")
    )
    second = restarted.generate_many(requests, concurrency=3)
    assert len(stub.requests) == 6  # nothing new was sent, even with another API key
    assert [c.text for c in second] == [c.text for c in first]
    assert all(c.cached for c in second)
    (summary,) = restarted.ledger.summary(restarted.run_id)
    assert (summary.calls, summary.cache_hits, summary.attempts) == (6, 6, 0)


def test_generate_many_reports_its_progress(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    from promptenv.llm.client import progress_lines

    requests = [GenerationRequest("s", f"patient {i}", PARAMS) for i in range(20)]
    ticks: list[tuple[int, int]] = []
    lines: list[str] = []
    say = progress_lines(lines.append, "answers")
    client_for(stub, workspace, fast_retry).generate_many(
        requests, concurrency=3, progress=lambda d, t: (ticks.append((d, t)), say(d, t))
    )
    assert sorted(ticks) == [(i, 20) for i in range(1, 21)]
    assert lines == [f"answers: {i}/20" for i in range(2, 21, 2)]
    eighteen: list[str] = []
    tick = progress_lines(eighteen.append, "x")
    for done in range(1, 19):
        tick(done, 18)
    assert eighteen == [f"x: {i}/18" for i in range(2, 19, 2)]


def test_disabled_cache_always_calls(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    client = client_for(stub, workspace, fast_retry, use_cache=False)
    client.generate("s", "q", PARAMS)
    client.generate("s", "q", PARAMS)
    assert len(stub.requests) == 2
    assert client.cache_stats.hits == 0
    assert not (workspace / "cache" / "llm_cache.sqlite").exists()


def test_identical_requests_in_flight_are_computed_once(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    stub.script(Action(200, delay_s=0.3))
    client = client_for(stub, workspace, fast_retry)
    completions = client.generate_many([GenerationRequest("s", "same", PARAMS)] * 8, concurrency=4)
    assert len(stub.requests) == 1
    assert sum(not c.cached for c in completions) == 1
    assert {c.text for c in completions} == {answer_for("same")}


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from promptenv.llm.cache import CachedAnswer, ResponseCache
    from promptenv.llm.ledger import Ledger, LedgerEntry

    folder, worker, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    cache = ResponseCache(folder / "llm_cache.sqlite")
    ledger = Ledger(folder / "llm_ledger.sqlite")
    while not go.exists():
        time.sleep(0.005)
    stored_shared = 0
    for i in range(100):
        key = f"shared-{i}" if i < 25 else f"w{worker}-{i}"
        answer = CachedAnswer(f"from {worker}", "m", 1, 2, "stop", 0.0)
        stored = cache.put(key, "anthropic", answer)
        stored_shared += stored and i < 25
        ledger.record(LedgerEntry("run", f"{worker}-{i}", "anthropic", "m", None, 1, 2, 0.0,
                                  False, 1, "ok", 0.01))
    print(stored_shared)
    """
)


def test_concurrent_writers_from_several_processes(tmp_path: Path) -> None:
    folder, go, workers = tmp_path / "cache", tmp_path / "go", 4
    ResponseCache(folder / "llm_cache.sqlite")  # create the file up front, as a client would
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(folder), str(w), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    go.touch()
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0] * workers, [err for _, err in outputs]
    # each shared key was stored by exactly one process: first writer wins, nobody failed
    assert sum(int(out) for out, _ in outputs) == 25
    cache = ResponseCache(folder / "llm_cache.sqlite")
    assert len(cache) == 25 + workers * 75
    for w in range(workers):
        answer = cache.get(f"w{w}-99")
        assert answer is not None and answer.text == f"from {w}"
    assert len(Ledger(folder / "llm_ledger.sqlite").entries("run")) == workers * 100
    with sqlite3.connect(folder / "llm_cache.sqlite") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
