"""A scriptable HTTP server on loopback that speaks the Anthropic Messages API and
OpenAI Chat Completions, records every request, and fails on command.

- ``server.script(Action(429, headers={"retry-after": "1"}), Action(529), ...)``:
  the next requests get these responses, in order, then normal answers.
- ``server.inject_faults(rate=0.3, seed=7)``: each request fails with
  probability ``rate`` (429, 500, 503 or 529, drawn from a seeded RNG).
- ``server.requests``: every request received (path, headers, body).
- ``server.hold_after(n)``: answer the next ``n`` requests, then hold every later
  one unanswered until ``server.release()`` (a client stuck mid-run, e.g. to be killed).

A normal answer is ``answer_for(user_text)``, so a test can check that each
answer belongs to its request; ``StubLLMServer(echo=True)`` answers with the
request's messages instead (an answer that mentions what the prompt told it).
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_STATUSES = (429, 500, 503, 529)


def answer_for(user_text: str) -> str:
    """The stub's answer to a user message."""
    return "guidance " + hashlib.sha256(user_text.encode()).hexdigest()[:12]


@dataclass
class Action:
    """One scripted response: a status (200 = normal answer), headers, a delay before answering."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    hold: bool = False  # wait for `StubLLMServer.release` before answering


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class StubLLMServer:
    """The server; start with ``start()`` (or as a context manager), stop with ``stop()``."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.requests: list[RecordedRequest] = []
        self.responses: list[int] = []
        self._script: deque[Action] = deque()
        self._fault_rate = 0.0
        self._fault_rng = random.Random(0)
        self._hold_from: int | None = None
        self._released = threading.Event()
        self._released.set()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> StubLLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> StubLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, *actions: Action) -> None:
        with self._lock:
            self._script.extend(actions)

    def inject_faults(self, rate: float, seed: int) -> None:
        with self._lock:
            self._fault_rate = rate
            self._fault_rng = random.Random(seed)

    def hold_after(self, n: int) -> None:
        """Answer the next ``n`` requests normally; hold the later ones until `release`."""
        with self._lock:
            self._hold_from = len(self.requests) + n
            self._released.clear()

    def release(self) -> None:
        """Answer the held requests and every later one."""
        with self._lock:
            self._hold_from = None
        self._released.set()

    @property
    def failures(self) -> int:
        """Requests answered with an error status."""
        return sum(status != 200 for status in self.responses)

    def bodies(self) -> list[str]:
        return [r.body.decode("utf-8") for r in self.requests]

    def _next_action(self, request: RecordedRequest) -> Action:
        with self._lock:
            self.requests.append(request)
            if self._hold_from is not None and len(self.requests) > self._hold_from:
                action = Action(hold=True)
            elif self._script:
                action = self._script.popleft()
            elif self._fault_rate and self._fault_rng.random() < self._fault_rate:
                action = Action(self._fault_rng.choice(FAULT_STATUSES))
            else:
                action = Action()
            self.responses.append(action.status)
            return action


def _handler_for(server: StubLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            request = RecordedRequest(
                self.path, {k.lower(): v for k, v in self.headers.items()}, body
            )
            action = server._next_action(request)
            if action.hold:
                server._released.wait()
            if action.delay_s:
                time.sleep(action.delay_s)
            payload = json.loads(body)
            anthropic = self.path.rstrip("/").endswith("/messages")
            if action.status == 200:
                text = _echo(payload) if server.echo else None
                reply = (
                    _anthropic_answer(payload, text) if anthropic else _openai_answer(payload, text)
                )
            else:
                reply = _error_body(action.status, anthropic)
            data = json.dumps(reply).encode()
            try:
                self.send_response(action.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in action.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

        def do_GET(self) -> None:
            data = b'{"object": "list", "data": []}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    content = [m for m in messages if m["role"] == "user"][-1]["content"]
    return content if isinstance(content, str) else "".join(b.get("text", "") for b in content)


def _echo(payload: dict[str, Any]) -> str:
    """The request's system text and messages, one per line."""
    system = payload.get("system") or ""
    parts = [system] if isinstance(system, str) else [b.get("text", "") for b in system]
    for m in payload["messages"]:
        content = m["content"]
        parts.append(
            content if isinstance(content, str) else "".join(b.get("text", "") for b in content)
        )
    return "\n".join(p for p in parts if p)


def _anthropic_answer(payload: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    text = text if text is not None else answer_for(_last_user_text(payload["messages"]))
    return {
        "id": "msg_stub",
        "type": "message",
        "role": "assistant",
        "model": payload["model"],
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 40, "output_tokens": 6},
    }


def _openai_answer(payload: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    text = text if text is not None else answer_for(_last_user_text(payload["messages"]))
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": payload["model"],
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 6, "total_tokens": 46},
    }


def _error_body(status: int, anthropic: bool) -> dict[str, Any]:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error")
    message = f"stub says {status}"
    if anthropic:
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "code": None}}
