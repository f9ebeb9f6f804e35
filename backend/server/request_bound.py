"""When one /predict's work stops: its client has disconnected, or its deadline has passed.

Nobody reads the answer to a client that has gone, and Label Studio throws away an answer later
than its ML_TIMEOUT_PREDICT (100 s): work for either only delays the requests queued behind it on
the one inference worker. So every wait of a request on the worker ends early when its client
disconnects or ``FREESEG_PREDICT_DEADLINE_SECONDS`` pass, and the job it waited for is cancelled: a
job not yet started is skipped by the worker, one running on the model finishes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


class RequestStopped(RuntimeError):
    """The request's work was stopped; ``kind`` and ``status`` are its answer's."""

    kind = "stopped"
    status = 503


class PredictDeadlineError(RequestStopped):
    kind = "predict_deadline"
    status = 504


class ClientGoneError(RequestStopped):
    kind = "client_gone"
    status = 499  # nobody reads it: the status says so in the access log


class RequestBound:
    """A request's deadline, and whether its client is still there (told by the ASGI ``receive``)."""

    def __init__(self, deadline_seconds: float):
        self.deadline_seconds = deadline_seconds
        self._deadline = time.monotonic() + deadline_seconds
        self._gone = asyncio.Event()

    @classmethod
    @asynccontextmanager
    async def of(cls, receive: Receive, deadline_seconds: float) -> AsyncIterator[RequestBound]:
        """The bound of a request whose body has been read, listening for its disconnect meanwhile."""
        bound = cls(deadline_seconds)
        listener = asyncio.create_task(bound._listen(receive))
        try:
            yield bound
        finally:
            listener.cancel()

    async def _listen(self, receive: Receive) -> None:
        """After the body, the server's next message is the disconnect (or the end of our answer)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self._gone.set()

    def check(self) -> None:
        """Raise when the work should stop; safe to call from the request's worker threads."""
        if self._gone.is_set():
            raise self._gone_error()
        if time.monotonic() >= self._deadline:
            raise self._deadline_error()

    async def wait(self, future: Future[T]) -> T:
        """The job's result; when the client goes or the deadline passes first, the job is cancelled and that raised.

        Also cancelled when this request is (at shutdown, after uvicorn's graceful timeout).
        """
        result = asyncio.wrap_future(future)
        gone = asyncio.create_task(self._gone.wait())
        try:
            await asyncio.wait((result, gone), timeout=max(self._deadline - time.monotonic(), 0),
                               return_when=asyncio.FIRST_COMPLETED)
            if result.done():
                return result.result()
            raise self._gone_error() if self._gone.is_set() else self._deadline_error()
        finally:
            gone.cancel()
            result.cancel()  # no result to copy over now
            future.cancel()  # the worker skips it, unless it has started it

    def _gone_error(self) -> ClientGoneError:
        return ClientGoneError("the client disconnected: its remaining tasks were not started")

    def _deadline_error(self) -> PredictDeadlineError:
        return PredictDeadlineError(
            f"the prediction did not finish within {self.deadline_seconds:g} s: its remaining tasks were cancelled; "
            f"send fewer tasks per request, or raise FREESEG_PREDICT_DEADLINE_SECONDS (keep it at most Label "
            f"Studio's ML_TIMEOUT_PREDICT, which throws later answers away)")
