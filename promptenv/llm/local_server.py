"""llama.cpp's OpenAI-compatible server on a local GGUF model, for ``openai:MODEL@URL``.

Run it by hand::

    python -m promptenv.llm.local_server --model PATH.gguf --host 127.0.0.1 --port 8080

(the same options as ``python -m llama_cpp.server``; ``--model`` defaults to
the packaged SmolLM2). It differs from ``python -m llama_cpp.server`` only in
loading the model without llama.cpp's extra buffer types, which crash on
machines that advertise AMX without enabling it (see
``promptenv.llm.backends.local``). Or from Python::

    with start_local_server() as server:
        client = LLMClient(f"openai:smollm2@{server.base_url}")

The server needs llama-cpp-python's ``server`` extras; ``missing_server_packages``
names what is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from promptenv.llm.backends.local import default_model_path, disable_extra_buffers_for_process
from promptenv.llm.errors import BackendConfigError

#: Module and pip requirement of each package the server imports.
SERVER_PACKAGES = {
    "uvicorn": "uvicorn==0.54.0",
    "fastapi": "fastapi==0.150.0",
    "pydantic_settings": "pydantic-settings==2.16.3",
    "sse_starlette": "sse-starlette==3.7.0",
    "starlette_context": "starlette-context==0.3.6",
    "yaml": "PyYAML==6.0.4",
}
DEFAULT_ALIAS = "smollm2"


def missing_server_packages() -> list[str]:
    """Pip requirements of the server's packages that are not importable here (empty when ready)."""
    return [
        req for module, req in SERVER_PACKAGES.items() if importlib.util.find_spec(module) is None
    ]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class LocalServer:
    """A running ``promptenv.llm.local_server`` process; a context manager that stops it."""

    def __init__(self, process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.log_path = log_path

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate the server (kill it after 10 s) and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_local_server(
    model_path: Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    n_ctx: int = 2048,
    n_threads: int = 2,
    alias: str = DEFAULT_ALIAS,
    log_path: Path | None = None,
    startup_timeout_s: float = 60.0,
) -> LocalServer:
    """Start the server in a subprocess and return once it answers ``GET /v1/models``.

    The OpenAI base URL is ``server.base_url`` (``http://HOST:PORT/v1``); the
    model answers to ``alias``. Raises ``BackendConfigError`` when the server's
    packages are missing, or when it exits or stays silent for
    ``startup_timeout_s`` (the message quotes the end of its log).
    """
    missing = missing_server_packages()
    if missing:
        raise BackendConfigError(
            "llama-cpp-python's server needs packages that are not installed: "
            + " ".join(missing)
            + " (pip install "
            + " ".join(missing)
            + ")"
        )
    model = model_path or default_model_path()
    port = port or free_port(host)
    log_file = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"pmlm-llama-server-{port}.log"
    command = [
        sys.executable, "-m", "promptenv.llm.local_server",
        "--model", str(model), "--model_alias", alias,
        "--host", host, "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads),
    ]  # fmt: skip
    with log_file.open("wb") as log_handle:
        # idle OpenMP threads sleep: see promptenv.llm.backends.local
        env = {"OMP_WAIT_POLICY": "passive", **os.environ}
        process = subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT, env=env)
    server = LocalServer(process, f"http://{host}:{port}/v1", log_file)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BackendConfigError(
                f"the llama.cpp server exited with code {process.returncode}: " + _tail(log_file)
            )
        try:
            with urllib.request.urlopen(f"{server.base_url}/models", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    server.stop()
    raise BackendConfigError(
        f"the llama.cpp server did not answer within {startup_timeout_s:g} s: " + _tail(log_file)
    )


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"


def main() -> None:
    """``python -m promptenv.llm.local_server``: llama_cpp.server with the default model."""
    missing = missing_server_packages()
    if missing:
        sys.exit("missing packages for the llama.cpp server: pip install " + " ".join(missing))
    if "--model" not in sys.argv and not os.environ.get("MODEL"):
        sys.argv += ["--model", str(default_model_path())]
    disable_extra_buffers_for_process()
    from llama_cpp.server.__main__ import main as server_main

    server_main()


if __name__ == "__main__":
    main()
