"""A bound on request bodies, checked before the body is read into memory."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _TooLarge(HTTPException):
    """Raised into the app when a streamed body passes the limit.

    An HTTPException, because FastAPI turns any other error met while reading a
    body into "400 There was an error parsing the body".
    """

    def __init__(self) -> None:
        super().__init__(413)


class RequestSizeLimit:
    """Answers 413 to bodies over ``max_bytes``: by Content-Length, or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        refused = started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                refused = True
                raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            """Passes the app's answer on, unless the body was refused: then ours replaces it."""
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            pass
        if refused and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": f"request body over the limit of {self.max_bytes} bytes (FREESEG_MAX_REQUEST_BYTES)"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})
