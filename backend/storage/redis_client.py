"""The one way the backend opens Redis, so every client keeps the same timeouts and retry policy.

The policy: no retries inside redis-py (``Retry(NoBackoff(), 0)``). A command that fails, fails once
within its timeout, and its caller decides what the outage means: the feature cache goes on without
Redis and leaves it alone for a while (its own back-off), the stores raise their ``StoreError``
(``kind`` ``store``), RQ retries chunks. Retries in the client would multiply every timeout while
Redis is down, where a prediction or a webhook is waiting.

What legitimately differs is the timeout, for connecting and for each reply: the stores wait
``STORE_TIMEOUT_SECONDS``, the feature cache FREESEG_CACHE_TIMEOUT_SECONDS (a miss is cheaper than a
wait), and queued runs ``BLOCKING`` (None: RQ's workers block on the queue, and RQ gives a worker's
connection the socket timeout its dequeue wait needs). Password and TLS come through the URL
(``redis://:password@host:6379/0``, ``rediss://...``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from backend.net.redact import without_credentials

STORE_TIMEOUT_SECONDS = 2.0
BLOCKING = None  # no timeout: the reads of queued runs' workers wait for work
_T = TypeVar("_T")


def redis_client(url: str, timeout_seconds: float | None = STORE_TIMEOUT_SECONDS) -> redis.Redis:
    """A client of the Redis at ``url``, its connects and replies bounded by ``timeout_seconds``, never retried.

    ``ValueError`` for an URL redis-py cannot read.
    """
    return redis.Redis.from_url(url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds,
                                retry=Retry(NoBackoff(), 0))


class RedisCalls:
    """A ``redis_client`` whose failures raise ``error`` with a message naming ``what`` and the URL without credentials."""

    def __init__(self, url: str, timeout_seconds: float, what: str, error: Callable[[str], Exception]) -> None:
        self._where, self._what, self._error = without_credentials(url), what, error
        try:
            self.client = redis_client(url, timeout_seconds)
        except ValueError as problem:
            raise error(f"bad Redis URL {self._where} (REDIS_URL): {problem}") from problem

    @property
    def where(self) -> str:
        return self._where

    def __call__(self, method: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return method(*args, **kwargs)
        except (redis.RedisError, OSError) as problem:
            raise self._error(f"{self._what} at {self._where} (REDIS_URL): {problem}") from problem
