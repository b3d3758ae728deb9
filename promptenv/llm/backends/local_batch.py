"""Batched generation on the local model: several sequences decoded together in one llama.cpp context.

``BatchScheduler`` owns a second llama.cpp context on the already loaded model,
holding ``parallel`` sequences, each in its own slice of the KV cache
(``n_ctx_seq`` tokens). Callers (one thread per request, as
``LLMClient.generate_many`` runs them) submit a prepared prompt and block on
its answer; a background thread runs continuous batching: every step decodes
one token of each running sequence (and the next part of newly admitted
prompts) in one ``llama_decode`` call, samples each sequence from its own
logits row with its own sampler chain, and as soon as a sequence finishes its
slot takes the next waiting prompt.

Each answer is generated as ``Llama.create_chat_completion`` generates it:
``prepare`` runs ``create_chat_completion`` with the same arguments as the
one-at-a-time path up to the point where it would start generating, and
keeps what it would generate from (the prompt tokens after the model's chat
template, the stop strings, the sampling settings). Each sequence gets the
sampler chain ``Llama`` builds (repeat penalty over the last 64 tokens, then
greedy, or top-k, typical, top-p, min-p, temperature and a seeded draw), and
the stop, length and UTF-8 rules of ``Llama._create_completion`` are applied
to it. What the batch path cannot reproduce (grammars, logit processors,
logprobs, no seed, a prompt near the context size) ``prepare`` declines, and
the caller answers it one at a time.

Determinism: an answer depends only on its own prompt and parameters, not on
which prompts ran beside it, up to floating-point differences between llama.cpp's
batched and single-sequence kernels (BENCHMARKS.md, "Batched local generation",
measures how often batched and one-at-a-time answers are equal).
"""

from __future__ import annotations

import inspect
import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from promptenv.llm.backends.base import BackendReply

#: Tokens of one sequence's slice of the KV cache (prompt + answer + margin must fit).
DEFAULT_BATCH_CTX = 1024
#: Tokens given to llama.cpp in one decode call (prompt chunks and one token per running sequence).
DEFAULT_BATCH_TOKENS = 512
#: Room left in a sequence's slice beyond max_tokens (the UTF-8 rule may add a few tokens).
_MARGIN = 8
#: ``Llama._init_sampler`` keyword -> ``create_completion`` keyword.
_SAMPLER_ARGS = {
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "temp": "temperature",
    "repeat_penalty": "repeat_penalty",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "tfs_z": "tfs_z",
    "mirostat_mode": "mirostat_mode",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}
#: ``create_completion`` arguments the batch path does not reproduce unless they have these values.
_ONLY = {
    "suffix": None,
    "logprobs": None,
    "echo": False,
    "stream": False,
    "logits_processor": None,
    "grammar": None,
    "logit_bias": None,
}


@dataclass(frozen=True)
class PreparedPrompt:
    """What ``Llama._create_completion`` would generate from, for one request."""

    tokens: tuple[int, ...]
    max_tokens: int
    stop: tuple[bytes, ...]
    seed: int
    sampler: Mapping[str, Any]
    #: The chat format's ``StoppingCriteriaList`` (ChatML's stops on an end-of-turn token).
    stopping_criteria: Any = None


class _Captured(Exception):
    def __init__(self, arguments: dict[str, Any]) -> None:
        super().__init__("create_completion arguments captured")
        self.arguments = arguments


def prepare(llama: Any, chat_arguments: Mapping[str, Any], n_ctx_seq: int) -> PreparedPrompt | None:
    """The prompt ``llama.create_chat_completion(**chat_arguments)`` would generate from.

    None when the batch path would not give the same answer (see the module
    docstring) or the prompt and answer do not fit ``n_ctx_seq`` tokens. The
    caller holds the model's lock.
    """
    signature = inspect.signature(type(llama).create_completion)

    def capture(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(llama, *args, **kwargs)
        bound.apply_defaults()
        raise _Captured(dict(bound.arguments))

    llama.create_completion = capture  # shadows the method on this instance only
    try:
        llama.create_chat_completion(**chat_arguments)
    except _Captured as captured:
        arguments = captured.arguments
    else:  # pragma: no cover - the chat handler always calls create_completion
        raise RuntimeError("create_chat_completion returned without calling create_completion")
    finally:
        del llama.create_completion
    prompt = arguments["prompt"]
    max_tokens = arguments["max_tokens"]
    if (
        not isinstance(prompt, list)
        or not prompt
        or arguments["seed"] is None
        or arguments["mirostat_mode"] != 0
        or any(arguments[name] != value for name, value in _ONLY.items())
        or max_tokens is None
        or max_tokens <= 0
        # Llama would shorten max_tokens to its context; the batch path does not
        or max_tokens + len(prompt) >= llama.n_ctx()
        or len(prompt) + max_tokens + _MARGIN > n_ctx_seq
    ):
        return None
    stop = arguments["stop"]
    stops = stop if isinstance(stop, list) else [stop] if isinstance(stop, str) else []
    return PreparedPrompt(
        tokens=tuple(prompt),
        max_tokens=int(max_tokens),
        stop=tuple(s.encode("utf-8") for s in stops),
        seed=int(arguments["seed"]),
        sampler={name: arguments[key] for name, key in _SAMPLER_ARGS.items()},
        stopping_criteria=arguments["stopping_criteria"],
    )


@dataclass
class _Sequence:
    """One running answer: its prompt, sampler and what it generated so far."""

    prompt: PreparedPrompt
    future: Future[BackendReply]
    sampler: Any
    fed: int = 0
    next_token: int | None = None
    completion: list[int] = field(default_factory=list)
    multibyte_fix: int = 0

    @property
    def position(self) -> int:
        return len(self.prompt.tokens) + len(self.completion)


class BatchScheduler:
    """Continuous batching of up to ``parallel`` sequences on one loaded ``llama_cpp.Llama``.

    ``lock`` is the model's lock: it is held for each decode step (and while
    preparing a prompt), so one-at-a-time calls on the same model interleave
    safely with a running batch.
    """

    def __init__(
        self,
        llama: Any,
        lock: threading.Lock,
        *,
        model_name: str,
        parallel: int,
        n_ctx_seq: int = DEFAULT_BATCH_CTX,
        n_threads: int,
        n_batch: int = DEFAULT_BATCH_TOKENS,
    ) -> None:
        if parallel < 2:
            raise ValueError(f"a batch needs at least 2 sequences, got parallel={parallel}")
        if n_batch < parallel:
            raise ValueError(f"n_batch={n_batch} must be at least parallel={parallel}")
        self.llama = llama
        self.lock = lock
        self.model_name = model_name
        self.parallel = parallel
        self.n_ctx_seq = n_ctx_seq
        self.n_threads = n_threads
        self.n_batch = n_batch
        #: Answers generated in a batch so far (requests ``prepare`` declined are not counted).
        self.answered = 0
        self._context: Any = None
        self._waiting: deque[_Sequence] = deque()
        self._queue_lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def submit(self, prompt: PreparedPrompt) -> Future[BackendReply]:
        """Queue ``prompt``; its future holds the answer (or the decode error)."""
        future: Future[BackendReply] = Future()
        with self.lock:  # the sampler is built from the Llama object
            sampler = self._sampler(prompt)
        with self._queue_lock:
            self._waiting.append(_Sequence(prompt, future, sampler))
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._run, name="pmlm-llama-batch", daemon=True
                )
                self._worker.start()
        return future

    def close(self) -> None:
        """Free the batch context (the next ``submit`` makes a new one)."""
        with self.lock:
            if self._context is not None:
                self._context.close()
                self._context = None

    # -- the background thread ---------------------------------------------------

    def _sampler(self, prompt: PreparedPrompt) -> Any:
        # the chain Llama.generate builds: Llama._init_sampler reads the seed from the object
        self.llama.set_seed(prompt.seed)
        return self.llama._init_sampler(**prompt.sampler)

    def _ensure_context(self) -> Any:
        if self._context is None:
            from llama_cpp import _internals, llama_cpp

            params = llama_cpp.llama_context_params.from_buffer_copy(self.llama.context_params)
            params.n_ctx = self.n_ctx_seq * self.parallel
            params.n_seq_max = self.parallel
            params.kv_unified = False  # one KV stream per sequence: attention reads its own
            params.n_batch = self.n_batch
            params.n_ubatch = self.n_batch
            params.n_threads = self.n_threads
            params.n_threads_batch = self.n_threads
            self._context = _internals.LlamaContext(
                model=self.llama._model, params=params, verbose=False
            )
        return self._context

    def _run(self) -> None:
        slots: list[_Sequence | None] = [None] * self.parallel
        try:
            while True:
                with self._queue_lock:
                    for s in range(self.parallel):
                        if slots[s] is None and self._waiting:
                            slots[s] = self._waiting.popleft()
                    if not any(slots):
                        self._worker = None
                        return
                with self.lock:
                    self._step(slots)
        except Exception as exc:
            # every waiting caller gets the error (it is raised again in their threads)
            with self._queue_lock:
                failed = [q for q in slots if q is not None] + list(self._waiting)
                self._waiting.clear()
                self._worker = None
            for seq in failed:
                if not seq.future.done():
                    seq.future.set_exception(exc)

    def _step(self, slots: list[_Sequence | None]) -> None:
        """One decode call for every running sequence, then one sampled token each."""
        from llama_cpp import llama_cpp

        context = self._ensure_context()
        memory = llama_cpp.llama_get_memory(context.ctx)
        n_vocab = self.llama.n_vocab()
        for s, seq in enumerate(slots):
            if seq is not None and seq.fed == 0 and seq.next_token is None:
                llama_cpp.llama_memory_seq_rm(memory, s, -1, -1)
        decoding = sum(1 for q in slots if q is not None and q.next_token is not None)
        room = self.n_batch - decoding
        batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        outputs: list[tuple[int, int]] = []  # (slot, row of its logits)
        try:
            n = 0
            # tokens in slot order: llama.cpp splits a batch on consecutive sequence ids
            for s, seq in enumerate(slots):
                if seq is None:
                    continue
                if seq.next_token is not None:
                    tokens, start = [seq.next_token], seq.position - 1
                else:
                    take = min(room, len(seq.prompt.tokens) - seq.fed)
                    if take == 0:
                        continue
                    room -= take
                    tokens, start = list(seq.prompt.tokens[seq.fed : seq.fed + take]), seq.fed
                    seq.fed += take
                for offset, token in enumerate(tokens):
                    batch.token[n] = token
                    batch.pos[n] = start + offset
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = s
                    batch.logits[n] = False
                    n += 1
                if seq.next_token is not None or seq.fed == len(seq.prompt.tokens):
                    batch.logits[n - 1] = True
                    outputs.append((s, n - 1))
            batch.n_tokens = n
            status = llama_cpp.llama_decode(context.ctx, batch)
            if status != 0:
                raise RuntimeError(
                    f"llama_decode failed with status {status} on a batch of {n} tokens "
                    f"({self.parallel} sequences of {self.n_ctx_seq} tokens); "
                    "try --llm-parallel 1"
                )
            for s, row in outputs:
                seq = slots[s]
                assert seq is not None
                token = seq.sampler.sample(context, row)
                logits = np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(context.ctx, row), shape=(n_vocab,)
                )
                reply = self._advance(seq, token, logits)
                if reply is not None:
                    slots[s] = None
                    llama_cpp.llama_memory_seq_rm(memory, s, -1, -1)
                    self.answered += 1
                    seq.future.set_result(reply)
        finally:
            llama_cpp.llama_batch_free(batch)

    def _advance(self, seq: _Sequence, token: int, logits: Any) -> BackendReply | None:
        """Take one sampled token; the reply when the sequence is finished.

        The rules of ``Llama.generate`` and of the non-streaming loop of
        ``Llama._create_completion``, in their order: the stopping criteria on
        the tokens evaluated so far, end of generation, the UTF-8 rule, stop
        strings, ``max_tokens``; then the stopping criteria once more, on what
        was evaluated, which turn any ending into a ``stop`` with the whole text.
        """
        from llama_cpp import llama_cpp

        llama = self.llama
        prompt = list(seq.prompt.tokens)
        criteria = seq.prompt.stopping_criteria

        def stops_on(evaluated: list[int]) -> bool:
            return criteria is not None and bool(
                criteria(np.asarray(evaluated, dtype=np.intc), logits)
            )

        def finish(text: bytes, reason: str, evaluated: list[int]) -> BackendReply:
            if stops_on(evaluated):
                text, reason = llama.detokenize(seq.completion, prev_tokens=prompt), "stop"
            return self._reply(seq, text, reason)

        if stops_on(prompt + seq.completion):
            return self._reply(seq, llama.detokenize(seq.completion, prev_tokens=prompt), "stop")
        if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
            text = llama.detokenize(seq.completion, prev_tokens=prompt)
            return finish(text, "stop", prompt + seq.completion)
        seq.completion.append(token)
        all_text = llama.detokenize(seq.completion, prev_tokens=prompt)
        evaluated = prompt + seq.completion[:-1]  # the new token is not decoded yet
        for k, char in enumerate(all_text[-3:]):
            k = 3 - k
            for num, pattern in ((2, 192), (3, 224), (4, 240)):
                if num > k and pattern & char == pattern:
                    seq.multibyte_fix = num - k
        if seq.multibyte_fix > 0:
            seq.multibyte_fix -= 1
        else:
            stops = [s for s in seq.prompt.stop if s in all_text]
            if stops:
                return finish(all_text[: all_text.index(stops[0])], "stop", evaluated)
            if len(seq.completion) >= seq.prompt.max_tokens:
                return finish(all_text, "length", evaluated)
        if seq.position >= self.n_ctx_seq:
            return finish(all_text, "length", evaluated)
        seq.next_token = token
        return None

    def _reply(self, seq: _Sequence, text: bytes, finish_reason: str) -> BackendReply:
        return BackendReply(
            text=text.decode("utf-8", errors="ignore"),
            model=self.model_name,
            input_tokens=len(seq.prompt.tokens),
            output_tokens=len(seq.completion),
            finish_reason=finish_reason,
        )
