"""A chat-completions server on 127.0.0.1 driven by a Python function (tests and the synthetic demo).

    with LoopbackChatServer(lambda request: chat_reply("Edited Description: a red circle")) as server:
        ChatConfig(base_url=server.base_url, model="any")

The responder receives the parsed request body and returns a :class:`Reply` (status, body, headers and
an optional delay), so tests can script slow answers, 429s, 500s and malformed bodies.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = ["Reply", "chat_reply", "LoopbackChatServer"]

LOOPBACK_HOST = "127.0.0.1"


@dataclass
class Reply:
    """What the server sends: ``body`` as bytes, text, or a JSON-serialisable value."""

    body: Any = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering


def chat_reply(content: str, model: str = "loopback") -> Reply:
    """A well-formed chat-completions answer carrying ``content``."""
    return Reply({
        "id": "chatcmpl-loopback", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    })


def _handler(server: "LoopbackChatServer") -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            if not self.path.rstrip("/").endswith("/chat/completions"):
                reply = Reply({"error": f"no route {self.path}"}, status=404)
            else:
                try:
                    request = json.loads(raw)
                except json.JSONDecodeError:
                    reply = Reply({"error": "request body is not JSON"}, status=400)
                else:
                    server.count_request(request, {k.lower(): v for k, v in self.headers.items()})
                    reply = server.responder(request)
            if reply.delay:
                time.sleep(reply.delay)
            body = reply.body
            if not isinstance(body, (bytes, str)):
                body = json.dumps(body)
            if isinstance(body, str):
                body = body.encode("utf-8")
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except ConnectionError:  # the client gave up (time-out) before the answer came
                pass

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server signature)
            """Silence the per-request log lines."""

    return Handler


class LoopbackChatServer:
    """Threaded HTTP server on 127.0.0.1 (a free port) answering ``POST …/chat/completions``.

    Use as a context manager; :attr:`base_url` ends in ``/v1``; :attr:`requests` counts the chat
    requests received (:attr:`bodies` keeps them, :attr:`headers` their HTTP headers, names lower-cased).
    """

    def __init__(self, responder: Callable[[dict[str, Any]], Reply]) -> None:
        self.responder = responder
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((LOOPBACK_HOST, 0), _handler(self))
        self._httpd.daemon_threads = True
        # A short poll interval: shutdown() waits up to one interval (the default 0.5 s, paid on every exit).
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="loopback-llm", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK_HOST}:{self._httpd.server_address[1]}/v1"

    def count_request(self, request: dict[str, Any], headers: dict[str, str]) -> None:
        with self._lock:
            self.requests += 1
            self.bodies.append(request)
            self.headers.append(headers)

    def __enter__(self) -> "LoopbackChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
