"""Connection settings of the LLM client: keys, base URLs, timeouts, local model size.

Keys are held in memory only: they are not in ``repr``, the cache key, the
cache, the ledger or any log line.

Example::

    config = ClientConfig()                     # everything from the environment
    config = ClientConfig(anthropic_api_key="...", timeout_s=30)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipelines.errors import ConfigError

#: How many answers the local model generates together, for every client of the process
#: (``--llm-parallel`` sets it; worker processes the process starts inherit it).
PARALLEL_ENV = "PMLM_LLM_PARALLEL"


def _parallel(raw: str, where: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(
            f"{where} {raw!r} is not a whole number of at least 1: give how many answers the "
            "local model generates together (1 = one at a time)"
        )
    return n


#: Local answers generated together by default. Measured on the 2-core machine
#: (BENCHMARKS.md, "Batched local generation"; 2 threads, OMP_WAIT_POLICY=passive, the
#: fastest setting one at a time in both runs): a batch of 8 answered the same 32
#: evaluation prompts 1.30x faster than one at a time on a quiet machine and 1.05x under
#: a load of 3 to 17, so batching is never slower there; 27-31 of 32 answers equal the
#: one-at-a-time answer, and recall did not move. ``--llm-parallel 1`` answers one at a time.
DEFAULT_LOCAL_PARALLEL = 8


def env_local_parallel() -> int:
    """``$PMLM_LLM_PARALLEL``, else `DEFAULT_LOCAL_PARALLEL`."""
    raw = os.environ.get(PARALLEL_ENV, "").strip()
    return _parallel(raw, PARALLEL_ENV + "=") if raw else DEFAULT_LOCAL_PARALLEL


def use_llm_parallel(n: int | None) -> None:
    """Have every LLM client of this process, and of the workers it starts, generate ``n``
    local answers together (None: leave it as it is)."""
    if n is not None:
        os.environ[PARALLEL_ENV] = str(_parallel(str(n), "--llm-parallel"))


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to reach the backends.

    Unset fields fall back to the environment when the backend is built:
    ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``ANTHROPIC_API_KEY``,
    ``ANTHROPIC_BASE_URL``, ``PMLM_PRICES``. A base URL in the backend spec
    (``openai:MODEL@URL``) wins over both.
    """

    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    anthropic_api_key: str | None = field(default=None, repr=False)
    anthropic_base_url: str | None = None
    #: Seconds before one HTTP attempt times out (then it is retried).
    timeout_s: float = 120.0
    #: Context window of the local model, in tokens (SmolLM2 supports 8192).
    local_n_ctx: int = 4096
    local_n_threads: int = 2
    #: Answers the local model generates together (``LLMClient.generate_many``); 1 = one at a
    #: time. Default: ``$PMLM_LLM_PARALLEL`` (`env_local_parallel`).
    local_parallel: int = field(default_factory=env_local_parallel)
    prices_path: Path | None = None


def public_endpoint(url: str) -> str:
    """``url`` without user:password, query string or fragment (they can hold secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", "")) if parts.scheme else url
