"""Batched generation on the real SmolLM2-135M model: several answers in one llama.cpp context."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from promptenv.llm import (
    Budget,
    BudgetExceeded,
    ClientConfig,
    GenerationParams,
    GenerationRequest,
    LLMClient,
)
from promptenv.llm.backends.local import (
    DEFAULT_N_CTX,
    DEFAULT_N_THREADS,
    DEFAULT_REPEAT_PENALTY,
    LocalBackend,
    default_model_path,
    load_model,
)
from promptenv.llm.backends.local_batch import prepare
from promptenv.llm.types import ChatMessage

#: Questions that ask for different things, and words an answer to each must use (or plurals).
TOPICS = (
    ("List three fruits.", ("banana", "apple", "orange", "grape", "mango", "pear", "cherry")),
    ("List three colors.", ("red", "blue", "green", "yellow", "purple", "black", "white")),
    ("Name three planets of the solar system.", ("venus", "mars", "jupiter", "earth", "saturn")),
    ("Name three animals.", ("cat", "dog", "elephant", "lion", "tiger", "horse", "cow")),
    ("List three days of the week.", ("monday", "tuesday", "wednesday", "friday", "sunday")),
)
SHORT = GenerationParams(max_tokens=16)


def batched_so_far() -> int:
    """Answers every batch scheduler of the default model has generated in this process."""
    loaded = load_model(default_model_path(), n_ctx=DEFAULT_N_CTX, n_threads=DEFAULT_N_THREADS)
    return sum(s.answered for s in loaded.batches.values())


def client_with(workspace: Path, parallel: int, **kwargs: object) -> LLMClient:
    config = ClientConfig(local_parallel=parallel)
    return LLMClient("local", workspace=workspace, config=config, **kwargs)  # type: ignore[arg-type]


def test_batched_answers_each_answer_its_own_prompt(workspace: Path) -> None:
    # five requests on four sequences: the slot that finishes first takes the fifth
    requests = [GenerationRequest("", question, SHORT) for question, _ in TOPICS]
    before = batched_so_far()
    batched = client_with(workspace / "b", 4, use_cache=False).generate_many(requests)
    assert batched_so_far() - before == len(TOPICS)  # every answer came from the batch
    for (question, words), answer in zip(TOPICS, batched, strict=True):
        found = re.findall(r"[a-z]+", answer.text.lower())
        assert any(w.startswith(words) for w in found), f"{question!r} got {answer.text!r}"
        assert answer.usage.input_tokens > 5 and 0 < answer.usage.output_tokens <= 16
    assert len({a.text for a in batched}) == len(TOPICS)
    one = client_with(workspace / "o", 1, use_cache=False).generate_many(requests)
    assert [a.text for a in batched] == [a.text for a in one]
    assert [a.usage for a in batched] == [a.usage for a in one]
    assert [a.finish_reason for a in batched] == [a.finish_reason for a in one]


def test_sampling_settings_are_per_sequence(workspace: Path) -> None:
    question = "Name one fruit."
    params = [
        GenerationParams(max_tokens=12, temperature=1.0, seed=1),
        GenerationParams(max_tokens=12, temperature=1.0, seed=2),
        GenerationParams(max_tokens=12, temperature=1.0, seed=3),
        GenerationParams(max_tokens=12, extras={"repeat_penalty": 1.0}),
    ]
    requests = [GenerationRequest("", question, p) for p in params]
    before = batched_so_far()
    batched = [
        c.text for c in client_with(workspace / "b", 4, use_cache=False).generate_many(requests)
    ]
    assert batched_so_far() - before == len(requests)
    one = [c.text for c in client_with(workspace / "o", 1, use_cache=False).generate_many(requests)]
    assert batched == one
    assert len(set(batched[:3])) >= 2  # each sequence draws with its own seed


def test_the_budget_counts_every_batched_answer(workspace: Path) -> None:
    requests = [
        GenerationRequest("", f"Say the number {i}.", GenerationParams(max_tokens=4))
        for i in range(8)
    ]
    client = client_with(workspace, 4, budget=Budget(max_calls=5), use_cache=False)
    with pytest.raises(BudgetExceeded) as refused:
        client.generate_many(requests)
    batch = refused.value.batch
    assert batch is not None and batch.done == 5 and len(batch.pending) == 3
    answered = [c for c in batch.completions if c is not None]
    rows = client.ledger.entries(client.run_id)
    assert [r.outcome for r in rows] == ["ok"] * 5
    assert sorted(r.tokens_out for r in rows) == sorted(c.usage.output_tokens for c in answered)
    assert client.spent.calls == 5
    assert client.spent.tokens == sum(c.usage.total for c in answered)


def test_a_repeated_request_in_a_batch_is_generated_once(workspace: Path) -> None:
    questions = ["Name a fruit.", "Name a color.", "Name a fruit.", "Name a planet."]
    requests = [GenerationRequest("", q, GenerationParams(max_tokens=6)) for q in questions]
    client = client_with(workspace, 4, budget=Budget(max_calls=10))
    answers = client.generate_many(requests)
    assert answers[0].text == answers[2].text
    assert sorted(a.cached for a in answers) == [False, False, False, True]
    outcomes = sorted(r.outcome for r in client.ledger.entries(client.run_id))
    assert outcomes == ["cache_hit", "ok", "ok", "ok"]
    assert client.spent.calls == 3


def test_parallel_1_answers_as_create_chat_completion_does(workspace: Path) -> None:
    questions = ["Name one prenatal vitamin.", "What is a glucose test for?"]
    params = GenerationParams(max_tokens=10)
    before = batched_so_far()
    client = client_with(workspace, 1, use_cache=False)
    answers = client.generate_many(
        [GenerationRequest("", q, params) for q in questions], concurrency=2
    )
    assert batched_so_far() == before  # no batch: the one-at-a-time path
    llama = load_model(default_model_path(), n_ctx=DEFAULT_N_CTX, n_threads=DEFAULT_N_THREADS).llama
    expected = []
    for question in questions:  # the call local.py made before batching existed
        llama.reset()
        reply = llama.create_chat_completion(
            messages=[{"role": "user", "content": question}],
            max_tokens=10,
            temperature=0.0,
            seed=0,
            stop=None,
            repeat_penalty=DEFAULT_REPEAT_PENALTY,
        )
        expected.append(reply["choices"][0]["message"]["content"])
    assert [a.text for a in answers] == expected


def test_what_the_batch_cannot_reproduce_is_answered_one_at_a_time(workspace: Path) -> None:
    backend = LocalBackend(parallel=4, batch_ctx=48)
    llama = load_model(backend.model_path, n_ctx=backend.n_ctx, n_threads=backend.n_threads).llama
    short = [ChatMessage("user", "Name a fruit.")]
    long = [ChatMessage("user", "Name a fruit. " * 10)]
    mirostat = GenerationParams(max_tokens=4, temperature=0.8, extras={"mirostat_mode": 2})
    assert prepare(llama, backend._chat_arguments(short, GenerationParams(max_tokens=4)), 48)
    assert prepare(llama, backend._chat_arguments(long, GenerationParams(max_tokens=4)), 48) is None
    assert prepare(llama, backend._chat_arguments(short, mirostat), 48) is None
    before = batched_so_far()
    reply = backend.complete(long, GenerationParams(max_tokens=4))
    assert batched_so_far() == before
    assert reply.text == LocalBackend().complete(long, GenerationParams(max_tokens=4)).text


def test_parallel_must_be_positive() -> None:
    from promptenv.llm import BackendConfigError

    with pytest.raises(BackendConfigError, match="parallel must be at least 1"):
        LocalBackend(parallel=0)
