"""The one loopback HTTP server of the tests: answers from routes, and records every request it gets.

Stand-ins for Label Studio, image hosts, a cloud bucket, the model hub and a proxy are all this server
with their own routes. A route is a function of the request's handler that writes the whole answer
(``send`` for the usual one); slow or broken answers write what they like. Tests that need a raw socket
(headers sent a byte at a time) open one themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Route = Callable[["RecordingHandler"], None]


@dataclass(frozen=True)
class Request:
    """One request as the server read it: ``path`` keeps its query."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def send(handler: BaseHTTPRequestHandler, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    """A whole answer on a connection closed afterwards; a HEAD gets the headers only."""
    handler.send_response(code)
    for name, value in {"Content-Length": str(len(body)), "Connection": "close", **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)
    handler.close_connection = True


def not_found(handler: BaseHTTPRequestHandler) -> None:
    send(handler, 404, b"not found")


def serving(body: bytes, content_type: str = "application/octet-stream") -> Route:
    """A route answering 200 with these bytes."""
    return lambda handler: send(handler, 200, body, {"Content-Type": content_type})


class RecordingServer(ThreadingHTTPServer):
    """Answers from ``routes`` (keyed by path without query; ``fallback`` for the others) and records each request.

    ``with RecordingServer() as server`` serves on ``server.url``; ``requests`` lists every request in the
    order read, before its route runs.
    """

    daemon_threads = True
    block_on_close = False  # a route still sleeping must not hold up the test's teardown

    def __init__(self, fallback: Route = not_found) -> None:
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.routes: dict[str, Route] = {}
        self.fallback = fallback
        self.requests: list[Request] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> RecordingServer:
        """Serves in a thread until the ``with`` ends."""
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    def handle_error(self, request: object, client_address: object) -> None:
        """A client hanging up on a refused or slow answer is expected here."""


class RecordingHandler(BaseHTTPRequestHandler):
    """What a route is given: the request (``command``, ``path``, ``headers``, and the ``body`` read) and its answer."""

    protocol_version = "HTTP/1.1"  # chunked answers need it; ``send`` closes each connection all the same
    server: RecordingServer
    body: bytes

    def _dispatch(self) -> None:
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(Request(self.command, self.path, dict(self.headers), self.body))
        self.server.routes.get(urlsplit(self.path).path, self.server.fallback)(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""
