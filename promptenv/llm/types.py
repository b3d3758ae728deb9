"""Named types shared by the LLM client: requests, parameters, completions, specs.

Everything here is a small frozen dataclass or an alias, so values can be
passed between threads, compared in tests and written to JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

#: The three kinds of backend a spec string can name.
BackendKind: TypeAlias = Literal["local", "openai", "anthropic"]

#: A value allowed in ``GenerationParams.extras`` (it must survive canonical JSON).
JSONScalar: TypeAlias = str | int | float | bool | None

#: The role of one chat message.
Role: TypeAlias = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    """One chat message as sent to a backend."""

    role: Role
    content: str


@dataclass(frozen=True)
class GenerationParams:
    """How to generate: the same fields for every backend.

    - ``max_tokens``: upper bound on generated tokens (> 0).
    - ``temperature``: 0 means greedy; the default is 0 so runs are reproducible.
    - ``seed``: sampling seed (local and OpenAI-compatible backends; the
      Anthropic Messages API has none). ``None`` lets the backend choose.
    - ``stop``: stop sequences.
    - ``extras``: backend-specific settings passed through unchanged, e.g.
      ``{"repeat_penalty": 1.3, "top_k": 40}`` for llama.cpp (the local model
      defaults to ``repeat_penalty=1.3``). For remote backends they go into the
      request body, so only send what that API accepts.

    Every field is part of the cache key.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = 0
    stop: tuple[str, ...] = ()
    extras: Mapping[str, JSONScalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.stop, str):
            # a bare string would otherwise be split into one stop sequence per character
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "extras", dict(self.extras))

    def as_json(self) -> dict[str, object]:
        """The parameters as plain JSON-able data (used for the cache key)."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "stop": list(self.stop),
            "extras": dict(sorted(self.extras.items())),
        }


@dataclass(frozen=True)
class KnownIdentifiers:
    """Identifiers of the patient a prompt is about, which must never leave the machine.

    The privacy guard replaces them (and their parts: a first name alone, a
    street line alone) in anything sent to a remote backend. Pass what the
    record holds: ``names`` (patient, relatives, clinicians), ``ids`` (patient
    id, MRN, encounter ids), ``dates`` (birth date...), ``addresses``,
    ``other`` (phone numbers, emails, any other free-text identifier).
    """

    names: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    dates: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    other: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("names", "ids", "dates", "addresses", "other"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    def __bool__(self) -> bool:
        return any((self.names, self.ids, self.dates, self.addresses, self.other))


@dataclass(frozen=True)
class GenerationRequest:
    """One request of a batch: the system and user text, the parameters, the identifiers to guard."""

    system: str
    user: str
    params: GenerationParams = field(default_factory=GenerationParams)
    identifiers: KnownIdentifiers = field(default_factory=KnownIdentifiers)


@dataclass(frozen=True)
class TokenUsage:
    """Tokens read and written by the model for one answer."""

    input_tokens: int
    output_tokens: int

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Completion:
    """One answer and what it cost.

    - ``text``: the answer.
    - ``model``: the model that answered, as the backend reported it.
    - ``backend``: ``"local"``, ``"openai"`` or ``"anthropic"``.
    - ``usage``: tokens in and out of that answer (for a cache hit, those of the
      original call).
    - ``latency_s``: wall time of this ``generate`` call, retries included.
    - ``cached``: True when the answer came from the cache (no backend call).
    - ``cost``: money spent by this call in the price table's currency (USD by
      default): 0 for cache hits and for the local model.
    - ``attempts``: backend attempts made (0 for a cache hit).
    - ``finish_reason``: why generation stopped (``"stop"``, ``"length"``...), if known.
    - ``cache_key``: sha256 of the canonical request.
    - ``redactions``: identifiers replaced by the privacy guard before sending.
    """

    text: str
    model: str
    backend: BackendKind
    usage: TokenUsage
    latency_s: float
    cached: bool
    cost: float
    attempts: int = 1
    finish_reason: str | None = None
    cache_key: str = ""
    redactions: int = 0


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend spec string (see ``promptenv.llm.spec.parse_backend_spec``).

    ``model`` is the model name for remote backends and the GGUF file name
    (without ``.gguf``) for the local one. ``base_url`` is set only when the
    spec names one (``openai:MODEL@URL``); ``model_path`` only for
    ``local:/path.gguf`` (``None`` means the packaged SmolLM2 model).
    """

    kind: BackendKind
    model: str | None = None
    base_url: str | None = None
    model_path: Path | None = None

    def __str__(self) -> str:
        if self.kind == "local":
            return "local" if self.model_path is None else f"local:{self.model_path}"
        suffix = f"@{self.base_url}" if self.base_url else ""
        return f"{self.kind}:{self.model}{suffix}"


@dataclass(frozen=True)
class Spend:
    """Calls, tokens and money counted against a budget."""

    calls: int = 0
    tokens: int = 0
    cost: float = 0.0

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.calls + other.calls, self.tokens + other.tokens, self.cost + other.cost)

    def __sub__(self, other: Spend) -> Spend:
        return Spend(self.calls - other.calls, self.tokens - other.tokens, self.cost - other.cost)


@dataclass(frozen=True)
class CacheStats:
    """Cache lookups of one client: hits, misses and the hit rate."""

    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass(frozen=True)
class BatchResult:
    """What ``generate_many`` finished before it stopped early.

    ``completions[i]`` answers request ``i``, or is ``None`` when that request
    was not answered.
    """

    completions: tuple[Completion | None, ...]

    @property
    def total(self) -> int:
        return len(self.completions)

    @property
    def done(self) -> int:
        return sum(c is not None for c in self.completions)

    @property
    def pending(self) -> tuple[int, ...]:
        """Indices of the requests without an answer."""
        return tuple(i for i, c in enumerate(self.completions) if c is None)

    def summary(self) -> str:
        """One sentence: how many were answered, which are left, how to finish."""
        pending = self.pending
        shown = ", ".join(str(i) for i in pending[:20]) + (", ..." if len(pending) > 20 else "")
        from_cache = sum(c is not None and c.cached for c in self.completions)
        return (
            f"{self.done} of {self.total} requests answered ({from_cache} from the cache), "
            f"{len(pending)} left (indices {shown}); finished answers are cached, so rerunning "
            f"the same requests only computes the rest"
        )
