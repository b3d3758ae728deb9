"""The process-wide local batch size (``--llm-parallel`` / $PMLM_LLM_PARALLEL)."""

from __future__ import annotations

import pytest

from pipelines.errors import ConfigError
from promptenv.llm.config import (
    DEFAULT_LOCAL_PARALLEL,
    PARALLEL_ENV,
    ClientConfig,
    use_llm_parallel,
)


def test_llm_parallel_reaches_every_new_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PARALLEL_ENV, raising=False)
    assert ClientConfig().local_parallel == DEFAULT_LOCAL_PARALLEL == 8  # as measured
    use_llm_parallel(None)
    assert ClientConfig().local_parallel == DEFAULT_LOCAL_PARALLEL
    use_llm_parallel(1)
    assert ClientConfig().local_parallel == 1  # one at a time, as asked
    use_llm_parallel(4)
    assert ClientConfig().local_parallel == 4
    assert ClientConfig(local_parallel=2).local_parallel == 2  # an explicit value wins


@pytest.mark.parametrize("raw", ["0", "-2", "two", "1.5"])
def test_a_bad_batch_size_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv(PARALLEL_ENV, raw)
    with pytest.raises(ConfigError, match=PARALLEL_ENV) as caught:
        ClientConfig()
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="--llm-parallel"):
        use_llm_parallel(0)
