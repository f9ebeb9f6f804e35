"""Retry Label Studio calls that fail for a while: timeouts, refused connections, 5xx answers.

A long run meets a restarting or overloaded Label Studio sooner or later; such a failure
is waited out (exponential backoff, each wait logged) instead of failing the task, and
only errors that another try can mend are retried: a 404 or a corrupt image is final.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
from label_studio_sdk.core.api_error import ApiError

from backend.images import ImageError
from backend.net.fetch import ImageFetchError
from backend.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_WAIT_SECONDS = 30.0
_TRANSIENT_STATUS = frozenset({408, 429})
_TRANSIENT_FETCH_KINDS = frozenset({"timeout", "connection"})
LABEL_STUDIO_ERRORS = (ApiError, httpx.HTTPError)  # what label-studio-sdk raises: an answer, or none


@dataclass(frozen=True)
class Backoff:
    """``attempts`` tries, waiting ``first_wait`` seconds after the first failure, doubling up to 30 s."""

    attempts: int = 6
    first_wait: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Backoff:
        return cls(settings.labelstudio_attempts, settings.labelstudio_backoff_seconds)

    def wait(self, failures: int) -> float:
        return min(self.first_wait * 2 ** (failures - 1), MAX_WAIT_SECONDS)


def is_transient(error: BaseException) -> bool:
    """Whether trying again later may succeed: a timeout, no connection, 408, 429 or 5xx."""
    if isinstance(error, ApiError):
        return _transient_status(error.status_code)
    if isinstance(error, ImageFetchError):
        status = error.kind.removeprefix("http_")
        return error.kind in _TRANSIENT_FETCH_KINDS or (status.isdigit() and _transient_status(int(status)))
    return isinstance(error, (httpx.TimeoutException, httpx.TransportError))


def _transient_status(status: int | None) -> bool:
    return status is None or status >= 500 or status in _TRANSIENT_STATUS


def describe(error: BaseException) -> str:
    """One line for logs and summaries: the HTTP status or the error's kind, never a token."""
    if isinstance(error, ApiError):
        detail = error.body.get("detail") if isinstance(error.body, dict) else None
        return f"HTTP {error.status_code}" + (f": {detail}" if detail else "")
    text = " ".join(str(error).split())
    if isinstance(error, (ImageFetchError, ImageError)):
        return text  # our own messages say what failed
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def with_backoff(call: Callable[[], T], what: str, backoff: Backoff) -> T:
    """``call()``, tried again after transient failures; the last failure (or a final one) is raised."""
    failures = 0
    while True:
        try:
            return call()
        except Exception as error:
            failures += 1
            if not is_transient(error) or failures >= backoff.attempts:
                raise
            wait = backoff.wait(failures)
            log.warning("%s failed (%s); try %d of %d in %.1f s", what, describe(error), failures + 1,
                        backoff.attempts, wait)
            time.sleep(wait)
