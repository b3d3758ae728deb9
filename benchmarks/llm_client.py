"""Speed of the LLM client: local generation, the cache, and concurrency.

    .venv/bin/python benchmarks/llm_client.py [--requests 8] [--max-tokens 48]

Prints:

1. local tokens per second: SmolLM2-135M in process (llama.cpp, 2 threads,
   greedy, repeat_penalty 1.3), cache off, 3 answers of up to 128 tokens;
2. calls per second with the cache cold (every request computed by the local
   model and stored) and warm (a new client on the same workspace: every
   request read back), and their ratio;
3. the speed-up of ``generate_many`` from concurrency 1 to 4 against
   llama.cpp's OpenAI-compatible server (``openai:smollm2@http://127.0.0.1:PORT/v1``),
   cache off;
4. the same speed-up against a loopback server that answers after a fixed
   200 ms, as a remote API does (the client's own concurrency, no model).

Everything runs on loopback; nothing is downloaded. The machine's load average
is printed because llama.cpp's speed depends on having the cores to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from promptenv.llm import ClientConfig, GenerationParams, GenerationRequest, LLMClient
from promptenv.llm.errors import BackendConfigError
from promptenv.llm.local_server import missing_server_packages, start_local_server

SYSTEM = "You are a concise obstetrics assistant."
TOPICS = [
    "the glucose tolerance test",
    "Tdap vaccination",
    "fetal movement counting",
    "iron supplements",
    "blood pressure checks",
    "the anatomy ultrasound",
    "Rh immunoglobulin",
    "group B strep screening",
    "prenatal vitamins",
    "sleep positions",
    "weight gain",
    "warning signs of preeclampsia",
]


def questions(n: int, tag: str) -> list[str]:
    return [f"({tag}) In two sentences, explain {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def load() -> str:
    return os.getloadavg().__repr__()


def local_tokens_per_second(workspace: Path) -> None:
    client = LLMClient("local", workspace=workspace, use_cache=False)
    started = time.perf_counter()
    client.generate(SYSTEM, "Hi.", GenerationParams(max_tokens=1))  # loads the model
    print(f"model load + first token: {time.perf_counter() - started:.2f} s")
    tokens, seconds = 0, 0.0
    for question in questions(3, "tps"):
        completion = client.generate(SYSTEM, question, GenerationParams(max_tokens=128))
        tokens += completion.usage.output_tokens
        seconds += completion.latency_s
    print(f"local tokens/s: {tokens / seconds:.1f} ({tokens} tokens in {seconds:.2f} s)")


def cache_cold_vs_warm(workspace: Path, n: int, max_tokens: int) -> None:
    requests = [
        GenerationRequest(SYSTEM, q, GenerationParams(max_tokens=max_tokens))
        for q in questions(n, "cache")
    ]
    cold_client = LLMClient("local", workspace=workspace)
    started = time.perf_counter()
    cold = [cold_client.generate(r.system, r.user, r.params) for r in requests]
    cold_s = time.perf_counter() - started
    warm_client = LLMClient("local", workspace=workspace)  # a restart: new client, same files
    started = time.perf_counter()
    warm = [warm_client.generate(r.system, r.user, r.params) for r in requests]
    warm_s = time.perf_counter() - started
    assert not any(c.cached for c in cold) and all(c.cached for c in warm)
    assert [c.text for c in cold] == [c.text for c in warm]
    print(
        f"cache cold: {n / cold_s:.2f} calls/s ({n} calls, {cold_s:.2f} s); "
        f"warm: {n / warm_s:.0f} calls/s ({warm_s * 1000 / n:.1f} ms/call); "
        f"warm/cold: {cold_s / warm_s:.0f}x"
    )


def concurrency_speedup(
    client: LLMClient, requests: list[GenerationRequest]
) -> tuple[float, float]:
    timings = []
    for concurrency in (1, 4):
        started = time.perf_counter()
        client.generate_many(requests, concurrency=concurrency)
        timings.append(time.perf_counter() - started)
    return timings[0], timings[1]


def llama_server_concurrency(workspace: Path, n: int, max_tokens: int) -> None:
    missing = missing_server_packages()
    if missing:
        print(f"llama.cpp server: not measured, missing packages: pip install {' '.join(missing)}")
        return
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        server = start_local_server(n_ctx=2048, log_path=workspace / "llama-server.log")
    except BackendConfigError as exc:
        print(f"llama.cpp server: not measured: {exc}")
        return
    with server:
        client = LLMClient(
            f"openai:smollm2@{server.base_url}", workspace=workspace, use_cache=False
        )
        params = GenerationParams(max_tokens=max_tokens, extras={"repeat_penalty": 1.3})
        client.generate(SYSTEM, "Hi.", GenerationParams(max_tokens=1))  # warm up
        requests = [GenerationRequest(SYSTEM, q, params) for q in questions(n, "server")]
        one, four = concurrency_speedup(client, requests)
    print(
        f"llama.cpp server, {n} requests of up to {max_tokens} tokens: concurrency 1: {one:.2f} s, "
        f"concurrency 4: {four:.2f} s, speed-up {one / four:.2f}x"
    )


class _SlowHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        time.sleep(0.2)
        body = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "remote",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def latency_bound_concurrency(workspace: Path, n: int) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        client = LLMClient(
            f"openai:remote@{url}",
            workspace=workspace,
            use_cache=False,
            config=ClientConfig(openai_api_key="unused"),
        )
        requests = [GenerationRequest(SYSTEM, q) for q in questions(n, "remote")]
        one, four = concurrency_speedup(client, requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
    print(
        f"200 ms remote stub, {n} requests: concurrency 1: {one:.2f} s, concurrency 4: "
        f"{four:.2f} s, speed-up {one / four:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per answer (2, 3)")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average at start: {load()}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pmlm-llm-bench-") as tmp:
        root = Path(tmp)
        local_tokens_per_second(root / "tps")
        cache_cold_vs_warm(root / "cache", args.requests, args.max_tokens)
        llama_server_concurrency(root / "server", args.requests, args.max_tokens)
        latency_bound_concurrency(root / "remote", args.requests)
    print(f"load average at end: {load()}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
