"""The one LLM client: every call goes through the privacy guard, cache, budget, retries and ledger.

Order of one ``generate`` call:

1. build the messages (system, user);
2. privacy guard for remote backends (redact or refuse; see ``privacy``), with
   the call's ``identifiers`` and the workspace's deny-list of every patient
   (``WORKSPACE/private/identifiers.json`` and the patients table, read once);
3. cache lookup on the sha256 of backend, model, params and exact messages;
   a hit is recorded in the ledger and returned at no cost;
4. on a miss, per attempt: reserve the worst case against the budget
   (``BudgetExceeded`` before the call), call the backend, record the attempt
   in the ledger; transient failures are retried with backoff;
5. store the answer in the cache.

Example::

    client = LLMClient("local", workspace="pmlm-workspace")
    answer = client.generate("You are a concise obstetrician.", "What is checked at 28 weeks?",
                             GenerationParams(max_tokens=64))
    answer.text, answer.usage.output_tokens, answer.cached

    answers = client.generate_many(
        [GenerationRequest(system, question) for question in questions], concurrency=4
    )
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.workspace import Workspace
from promptenv.llm.backends import Backend, BackendReply, make_backend
from promptenv.llm.budget import Budget, BudgetTracker
from promptenv.llm.cache import CachedAnswer, ResponseCache, cache_key
from promptenv.llm.config import ClientConfig
from promptenv.llm.deny_list import DenyList, workspace_deny_list
from promptenv.llm.errors import (
    BackendConfigError,
    LLMError,
    PermanentBackendError,
    RetriesExhausted,
    TransientBackendError,
)
from promptenv.llm.ledger import Ledger, LedgerEntry, Outcome
from promptenv.llm.prices import PriceTable
from promptenv.llm.privacy import PrivacyPolicy, guard_messages
from promptenv.llm.retry import JitterSource, RetryPolicy
from promptenv.llm.spec import parse_backend_spec
from promptenv.llm.types import (
    BackendSpec,
    BatchResult,
    CacheStats,
    ChatMessage,
    Completion,
    GenerationParams,
    GenerationRequest,
    KnownIdentifiers,
    Spend,
    TokenUsage,
)

log = logging.getLogger(__name__)

_KEY_LOCK_STRIPES = 1024

CACHE_FILE = "llm_cache.sqlite"
LEDGER_FILE = "llm_ledger.sqlite"


def new_run_id() -> str:
    """A fresh run id: UTC time and a random suffix, e.g. ``20250101T120000Z-3f9a1c``."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def workspace_paths(workspace: Workspace | Path | str | None) -> tuple[Path, Path]:
    """The cache and ledger files of a workspace: ``cache/llm_cache.sqlite``, ``cache/llm_ledger.sqlite``."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
    return ws.cache_dir / CACHE_FILE, ws.cache_dir / LEDGER_FILE


def estimate_tokens(messages: Sequence[ChatMessage]) -> int:
    """A deliberately high estimate of input tokens (3 characters a token, 8 per message)."""
    return sum(math.ceil(len(m.content) / 3) + 8 for m in messages)


class LLMClient:
    """Generates text with one backend, with cache, retries, ledger, budget and privacy guard.

    - ``backend``: a spec string (``"local"``, ``"openai:MODEL[@URL]"``,
      ``"anthropic:MODEL[@URL]"``), a parsed ``BackendSpec``, or a ``Backend``.
    - ``workspace``: where ``cache/llm_cache.sqlite`` and
      ``cache/llm_ledger.sqlite`` live (default ``$PMLM_WORKSPACE`` or
      ``./pmlm-workspace``); ``cache_path``/``ledger_path`` override each file.
    - ``run_id``: the ledger's run; reusing one resumes its budget.
    - ``budget``, ``retry``, ``privacy``: see ``Budget``, ``RetryPolicy``, ``PrivacyPolicy``.
    - ``use_cache=False`` always calls the backend (answers are not stored).

    Thread-safe: ``generate`` may be called from many threads.
    """

    def __init__(
        self,
        backend: str | BackendSpec | Backend = "local",
        *,
        workspace: Workspace | Path | str | None = None,
        config: ClientConfig | None = None,
        run_id: str | None = None,
        budget: Budget | None = None,
        retry: RetryPolicy | None = None,
        privacy: PrivacyPolicy | None = None,
        use_cache: bool = True,
        cache_path: Path | str | None = None,
        ledger_path: Path | str | None = None,
        jitter_seed: int | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        if isinstance(backend, str):
            backend = parse_backend_spec(backend)
        self.backend: Backend = (
            make_backend(backend, self.config) if isinstance(backend, BackendSpec) else backend
        )
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
        self._deny: DenyList | None = None
        self._deny_lock = threading.Lock()
        default_cache, default_ledger = workspace_paths(self.workspace)
        self.cache = ResponseCache(cache_path or default_cache) if use_cache else None
        self.ledger = Ledger(ledger_path or default_ledger)
        self.prices = PriceTable.load(self.config.prices_path)
        self.run_id = run_id or new_run_id()
        self.retry = retry or RetryPolicy()
        self.privacy = privacy or PrivacyPolicy()
        budget = budget or Budget()
        self._price = self.prices.price(self.backend.kind, self.backend.model)
        if budget.max_cost is not None and self._price is None:
            raise BackendConfigError(
                f"a money budget needs a price for {self.label}, and the price table "
                f"{self.prices.source} has none: add it there (or in a file named by PMLM_PRICES)"
            )
        if self._price is None:
            # a self-hosted server on this machine costs nothing; a remote one should be priced
            loopback = urlsplit(self.backend.endpoint).hostname in ("127.0.0.1", "localhost", "::1")
            log.log(
                logging.INFO if loopback else logging.WARNING,
                "no price for %s in %s: its cost is recorded as 0",
                self.label,
                self.prices.source,
            )
        self._budget = BudgetTracker(budget, self.ledger, budget.scope_for(self.run_id))
        self._jitter = JitterSource(jitter_seed)
        self._counts_lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._key_locks = [threading.Lock() for _ in range(_KEY_LOCK_STRIPES)]

    @property
    def label(self) -> str:
        """``kind:model``, for messages (no URL credentials, no keys)."""
        return f"{self.backend.kind}:{self.backend.model}"

    @property
    def deny_list(self) -> DenyList:
        """The workspace's deny-list, read on first use (every remote call passes it)."""
        with self._deny_lock:
            if self._deny is None:
                self._deny = workspace_deny_list(self.workspace)
            return self._deny

    @property
    def cache_stats(self) -> CacheStats:
        """Hits and misses of this client's cache lookups."""
        with self._counts_lock:
            return CacheStats(hits=self._hits, misses=self._misses)

    @property
    def spent(self) -> Spend:
        """What this client's budget scope (by default its run) has used so far."""
        return self._budget.spent

    def generate(
        self,
        system: str,
        user: str,
        params: GenerationParams | None = None,
        *,
        identifiers: KnownIdentifiers | None = None,
    ) -> Completion:
        """Answer ``user`` (with the ``system`` text, which may be empty) and return a ``Completion``.

        ``identifiers``: the patient's names, ids, dates, addresses, which the
        privacy guard removes before a remote call (on top of its patterns).

        Raises ``PrivacyViolation`` (refuse mode), ``BudgetExceeded`` (before
        the call), ``PermanentBackendError`` (400/401/403/404...),
        ``RetriesExhausted`` (transient failures outlasted the retry policy),
        ``BackendConfigError``.
        """
        started = time.perf_counter()
        params = params or GenerationParams()
        messages = [ChatMessage("system", system)] if system else []
        messages.append(ChatMessage("user", user))
        redacted: dict[str, int] = {}
        if self.privacy.applies_to(remote=not self.backend.is_local):
            messages, redacted = guard_messages(
                messages, identifiers, self.privacy, backend=self.label, deny=[self.deny_list]
            )
        key = cache_key(self.backend.identity, self.backend.model, params, messages)
        call = _Call(uuid.uuid4().hex, key, redacted, started)
        if self.cache is None:
            self._count(hit=False)
            return self._call_backend(call, messages, params)
        stored = self.cache.get(key)
        if stored is None:
            # one caller per key computes; the others wait and then read the cache
            with self._key_lock(key):
                stored = self.cache.get(key)
                if stored is None:
                    self._count(hit=False)
                    return self._call_backend(call, messages, params)
        self._count(hit=True)
        return self._serve_cached(call, stored)

    def generate_many(
        self,
        requests: Sequence[GenerationRequest],
        concurrency: int = 4,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """Answer every request with up to ``concurrency`` calls in flight; results in request order.

        A local backend with ``parallel`` > 1 (``ClientConfig.local_parallel``)
        runs at least that many calls at once and generates them together in
        one llama.cpp context (`promptenv.llm.backends.local_batch`); each
        answer still goes through the cache, budget and ledger on its own.

        ``progress(done, total)`` is called after each answered request (see
        `progress_lines` for one that says it every tenth).

        When one request fails (budget, permanent error, retries exhausted,
        privacy refusal), no new request is started, those in flight finish
        (and are cached), and that first error is raised with ``error.batch``:
        a ``BatchResult`` holding the finished answers and the indices left.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        results: list[Completion | None] = [None] * len(requests)
        stop = threading.Event()
        failures: list[BaseException] = []
        failures_lock = threading.Lock()
        answered = [0]

        def answer(index: int) -> None:
            if stop.is_set():
                return
            request = requests[index]
            try:
                results[index] = self.generate(
                    request.system, request.user, request.params, identifiers=request.identifiers
                )
            except Exception as exc:
                with failures_lock:
                    failures.append(exc)
                stop.set()
                return
            if progress is not None:
                with failures_lock:  # in order: done counts 1, 2, ... for the callback
                    answered[0] += 1
                    progress(answered[0], len(requests))

        # a batching local backend answers as many requests together as run at once
        concurrency = max(concurrency, getattr(self.backend, "parallel", 1))
        workers = max(1, min(concurrency, len(requests)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pmlm-llm") as pool:
            list(pool.map(answer, range(len(requests))))
        if failures:
            first = failures[0]
            batch = BatchResult(tuple(results))
            if isinstance(first, LLMError):
                first.batch = batch
            else:
                first.add_note(batch.summary())
            log.error("generate_many stopped: %s", batch.summary())
            raise first
        return [c for c in results if c is not None]

    # -- internals -----------------------------------------------------------

    def _count(self, *, hit: bool) -> None:
        with self._counts_lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    def _key_lock(self, key: str) -> threading.Lock:
        # striped: bounded memory; two keys share a lock with probability 1/1024
        return self._key_locks[int(key[:8], 16) % _KEY_LOCK_STRIPES]

    def _worst_case(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Spend:
        tokens_in = estimate_tokens(messages)
        cost = self._price.cost(tokens_in, params.max_tokens) if self._price else 0.0
        return Spend(calls=1, tokens=tokens_in + params.max_tokens, cost=cost)

    def _record(
        self,
        call: _Call,
        *,
        outcome: Outcome,
        attempt: int,
        latency_s: float,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost: float = 0.0,
        status: int | None = None,
        error_kind: str | None = None,
        wait_s: float = 0.0,
        hold: int | None = None,
    ) -> None:
        self.ledger.record(
            LedgerEntry(
                run_id=self.run_id,
                request_id=call.request_id,
                backend=self.backend.kind,
                model=self.backend.model,
                endpoint=self.backend.endpoint,
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                cost=cost,
                cached=outcome == "cache_hit",
                attempt=attempt,
                outcome=outcome,
                latency_s=latency_s,
                status=status,
                error_kind=error_kind,
                wait_s=wait_s,
                redactions=sum(call.redacted.values()),
                redaction_kinds=",".join(f"{k}:{n}" for k, n in sorted(call.redacted.items())),
                budget_scope=self._budget.scope,
            ),
            hold=hold,
        )

    def _serve_cached(self, call: _Call, stored: CachedAnswer) -> Completion:
        latency = time.perf_counter() - call.started
        self._record(
            call,
            outcome="cache_hit",
            attempt=0,
            latency_s=latency,
            tokens_in=stored.input_tokens,
            tokens_out=stored.output_tokens,
        )
        return Completion(
            text=stored.text,
            model=stored.model,
            backend=self.backend.kind,
            usage=TokenUsage(stored.input_tokens, stored.output_tokens),
            latency_s=latency,
            cached=True,
            cost=0.0,
            attempts=0,
            finish_reason=stored.finish_reason,
            cache_key=call.key,
            redactions=sum(call.redacted.values()),
        )

    def _call_backend(
        self, call: _Call, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> Completion:
        attempt = 0
        while True:
            attempt += 1
            # the attempt's ledger row releases the hold (the budget's source of truth)
            hold = self._budget.reserve(self._worst_case(messages, params))
            attempt_started = time.perf_counter()
            try:
                reply = self.backend.complete(messages, params)
            except TransientBackendError as exc:
                self._retry_or_raise(
                    call, exc, attempt, time.perf_counter() - attempt_started, hold
                )
                continue
            except Exception as exc:
                self._record(
                    call,
                    outcome="error",
                    attempt=attempt,
                    latency_s=time.perf_counter() - attempt_started,
                    status=exc.status if isinstance(exc, PermanentBackendError) else None,
                    error_kind=_error_kind(exc),
                    hold=hold,
                )
                raise
            except BaseException:  # interrupted: no row, so give the hold back
                if hold is not None:
                    self.ledger.release(hold)
                raise
            return self._finish(call, reply, hold, attempt, attempt_started)

    def _retry_or_raise(
        self,
        call: _Call,
        exc: TransientBackendError,
        attempt: int,
        latency_s: float,
        hold: int | None,
    ) -> None:
        """Record a transient failure, then sleep before the next attempt or raise."""
        policy = self.retry
        asked = exc.retry_after_s
        give_up: str | None = None
        if attempt >= policy.max_attempts:
            give_up = (
                f"{exc}; still failing after {attempt} attempts (RetryPolicy.max_attempts="
                f"{policy.max_attempts}): try later, lower the concurrency or allow more attempts"
            )
        elif asked is not None and asked > policy.max_retry_after_s:
            give_up = (
                f"{exc}; the server asked to wait {asked:.0f} s, more than "
                f"RetryPolicy.max_retry_after_s={policy.max_retry_after_s:g}"
            )
        wait = 0.0 if give_up else self._jitter.wait_s(policy, attempt, asked)
        self._record(
            call,
            outcome="error" if give_up else "retry",
            attempt=attempt,
            latency_s=latency_s,
            status=exc.status,
            error_kind=_error_kind(exc),
            wait_s=wait,
            hold=hold,
        )
        if give_up:
            raise RetriesExhausted(give_up, last=exc, attempts=attempt) from exc
        log.warning(
            "%s attempt %d/%d failed (%s); retrying in %.2f s",
            self.label,
            attempt,
            policy.max_attempts,
            exc,
            wait,
        )
        time.sleep(wait)

    def _finish(
        self,
        call: _Call,
        reply: BackendReply,
        hold: int | None,
        attempt: int,
        attempt_started: float,
    ) -> Completion:
        now = time.perf_counter()
        cost = self._price.cost(reply.input_tokens, reply.output_tokens) if self._price else 0.0
        # the ledger row first: it settles the budget hold
        self._record(
            call,
            outcome="ok",
            attempt=attempt,
            latency_s=now - attempt_started,
            tokens_in=reply.input_tokens,
            tokens_out=reply.output_tokens,
            cost=cost,
            hold=hold,
        )
        if self.cache is not None:
            self.cache.put(
                call.key,
                self.backend.kind,
                CachedAnswer(
                    text=reply.text,
                    model=reply.model,
                    input_tokens=reply.input_tokens,
                    output_tokens=reply.output_tokens,
                    finish_reason=reply.finish_reason,
                    cost=cost,
                ),
            )
        return Completion(
            text=reply.text,
            model=reply.model,
            backend=self.backend.kind,
            usage=TokenUsage(reply.input_tokens, reply.output_tokens),
            latency_s=time.perf_counter() - call.started,
            cached=False,
            cost=cost,
            attempts=attempt,
            finish_reason=reply.finish_reason,
            cache_key=call.key,
            redactions=sum(call.redacted.values()),
        )


class _Call:
    """What one ``generate`` call carries through its attempts."""

    __slots__ = ("key", "redacted", "request_id", "started")

    def __init__(self, request_id: str, key: str, redacted: dict[str, int], started: float):
        self.request_id = request_id
        self.key = key
        self.redacted = redacted
        self.started = started


def _error_kind(exc: BaseException) -> str:
    """The SDK exception class behind a failure (``RateLimitError``, ``APITimeoutError``...)."""
    cause = exc.__cause__
    return type(cause).__name__ if cause is not None else type(exc).__name__


def generate(
    system: str,
    user: str,
    params: GenerationParams | None = None,
    *,
    backend: str = "local",
    workspace: Workspace | Path | str | None = None,
    identifiers: KnownIdentifiers | None = None,
) -> Completion:
    """One call with a one-off ``LLMClient`` (its own run id); see ``LLMClient.generate``."""
    client = LLMClient(backend, workspace=workspace)
    return client.generate(system, user, params, identifiers=identifiers)


def progress_lines(say: Callable[[str], None], what: str) -> Callable[[int, int], None]:
    """A ``generate_many`` progress callback that says ``what: done/total`` every tenth or so."""

    def tick(done: int, total: int) -> None:
        if done == total or done % -(-total // 10) == 0:  # every ceil(total / 10)
            say(f"{what}: {done}/{total}")

    return tick
