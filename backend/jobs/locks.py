"""A short per-task lock around writing a prediction, so that two workers never both write one.

Two workers hold the same task only when a chunk is run again while its first worker
still lives (it lost Redis for longer than the lease, say) or when two runs cover one
project. The writer holds ``freeseg:lock:<scope>:<task>`` (Redis ``SET NX PX`` through
redis-py's ``Lock``) while it checks the task's predictions and writes its own; the
lock expires after the lease, so one left by a killed worker frees itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import redis
from redis.exceptions import LockError

Refresh = Callable[[], None]


class WriteLocks(Protocol):
    def holding(self, task: str) -> AbstractContextManager[Refresh | None]:
        """Yields a callable that extends the lock, or None when another writer kept it for a whole lease."""


class NoLocks:
    """One process writes alone: nothing to lock."""

    @contextmanager
    def holding(self, task: str) -> Iterator[Refresh | None]:
        yield lambda: None


class RedisLocks:
    """Locks shared by every worker of a Redis; ``scope`` names the Label Studio and model version."""

    def __init__(self, connection: redis.Redis, scope: str, seconds: float) -> None:
        self.connection, self.scope, self.seconds = connection, scope, seconds

    @contextmanager
    def holding(self, task: str) -> Iterator[Refresh | None]:
        lock = self.connection.lock(f"freeseg:lock:{self.scope}:{task}", timeout=self.seconds,
                                    blocking_timeout=self.seconds, thread_local=False)
        if not lock.acquire():
            yield None
            return
        try:
            yield lock.reacquire
        finally:
            try:
                lock.release()
            except LockError:  # it expired while we wrote, and may be someone else's now
                pass
