"""The ``openai`` backend against a real OpenAI-compatible server: llama.cpp's own,
serving SmolLM2 on loopback (started once per session by the ``llama_server`` fixture)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from promptenv.llm import GenerationParams, GenerationRequest, LLMClient, PermanentBackendError
from promptenv.llm.local_server import LocalServer

SYSTEM = "You are a concise obstetrics assistant."
PARAMS = GenerationParams(max_tokens=16, extras={"repeat_penalty": 1.3})


def test_chat_completion_through_the_real_server(
    llama_server: LocalServer, workspace: Path
) -> None:
    client = LLMClient(f"openai:smollm2@{llama_server.base_url}", workspace=workspace)
    completion = client.generate(SYSTEM, "Name one test done at 28 weeks of pregnancy.", PARAMS)
    assert completion.backend == "openai" and not completion.cached
    assert len(completion.text.split()) >= 2
    assert 0 < completion.usage.output_tokens <= 16
    assert completion.usage.input_tokens > 10
    assert completion.model == "smollm2"  # the server's alias came back from the server
    again = client.generate(SYSTEM, "Name one test done at 28 weeks of pregnancy.", PARAMS)
    assert again.cached and again.text == completion.text
    (summary,) = client.ledger.summary(client.run_id)
    assert (summary.calls, summary.attempts, summary.cache_hits, summary.cost) == (2, 1, 1, 0.0)


def test_same_seed_same_text_through_the_server(llama_server: LocalServer, workspace: Path) -> None:
    """The seed reaches the server: the same sampled request twice, at once, gives the same text.

    Unlike the local backend, which resets the KV cache before every call, llama.cpp's
    server reuses the prompt's cached prefix and evaluates only its last token again;
    those logits can differ in their last bits from a fresh prefill, and at temperature
    0.9 that can change the text (seen on an AMD EPYC machine). So the prompt is asked
    once first: both requests then meet the same cached state.
    """
    client = LLMClient(
        f"openai:smollm2@{llama_server.base_url}", workspace=workspace, use_cache=False
    )
    sampled = GenerationParams(
        max_tokens=12, temperature=0.9, seed=7, extras={"repeat_penalty": 1.3}
    )
    question = "Give one tip for a healthy pregnancy."
    client.generate(SYSTEM, question, sampled)  # the prompt's prefix is now in the server's cache
    requests = [GenerationRequest(SYSTEM, question, sampled)] * 2
    first, second = client.generate_many(requests, concurrency=2)
    assert first.text == second.text
    other = client.generate(SYSTEM, question, replace(sampled, seed=8))
    assert other.text != first.text  # the seed is what makes them equal


def test_wrong_base_url_is_a_clear_404(llama_server: LocalServer, workspace: Path) -> None:
    wrong = llama_server.base_url.removesuffix("/v1") + "/nope"
    client = LLMClient(f"openai:smollm2@{wrong}", workspace=workspace)
    with pytest.raises(PermanentBackendError, match=r"404 from openai at .*check the model name"):
        client.generate(SYSTEM, "hello", PARAMS)
