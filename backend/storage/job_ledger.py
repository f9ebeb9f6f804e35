"""What happened to each task of a run: done, skipped or failed (with a reason), each counted once.

A chunk that is run again (its worker died, or it failed and RQ retried it) finds the
tasks it already settled in the ledger and leaves them alone, so counts stay exact and
no task is predicted twice within a run. In-process runs keep the ledger in memory;
queued runs keep it in Redis, where workers on every machine and ``freesegdiff jobs``
read it:

- ``freeseg:runs``: a sorted set of run ids by creation time;
- ``freeseg:run:<id>``: a hash with ``kind``, ``target``, ``total``, ``chunks``,
  ``created``, ``started``, ``updated``, ``model_version`` and the counters
  ``done``, ``skipped``, ``failed``;
- ``freeseg:run:<id>:outcomes``: a hash from task id (or image path) to ``done``,
  ``skipped`` or ``failed``, and ``freeseg:run:<id>:failures`` from a failed one to its reason;
- ``freeseg:run:<id>:jobs``: the list of the run's RQ job ids;
- ``freeseg:run:<id>:memory``: the project memory a run predicts with, as its first chunk read it
  (empty when the project had none), so that every chunk predicts with the same one; deleted
  once every task is settled.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import redis

RUNS_KEY = "freeseg:runs"
RUN_TTL_SECONDS = 7 * 24 * 3600
# Settle a task once: store its outcome unless one is there, and count it only then.
_RECORD_ONCE = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('HSET', KEYS[1], 'updated', ARGV[4])
if ARGV[2] == 'failed' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
return 1
"""


class Outcome(str, Enum):
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class RunProgress:
    """A run's counts, its failures (item, one-line reason) and how long its workers have worked on it."""

    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # from the first chunk's start to the last settled task

    @property
    def settled(self) -> int:
        return self.done + self.skipped + self.failed

    @property
    def complete(self) -> bool:
        return self.settled >= self.total

    @property
    def per_second(self) -> float:
        return self.settled / self.seconds if self.seconds > 0 else 0.0


class Ledger(Protocol):
    def begin(self) -> None:
        """A chunk starts: the run's clock starts with its first chunk."""

    def settled(self, item: str) -> bool:
        """Whether ``item`` already has an outcome in this run."""

    def record(self, item: str, outcome: Outcome, reason: str = "") -> bool:
        """Store ``item``'s outcome unless it has one; True when this call stored it."""

    def progress(self) -> RunProgress: ...


class ProcessLedger:
    """The ledger of a run in this process."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.outcomes: dict[str, Outcome] = {}
        self.counts = {outcome: 0 for outcome in Outcome}
        self.failures: list[tuple[str, str]] = []
        self.started = self.updated = time.monotonic()

    def begin(self) -> None:
        pass

    def settled(self, item: str) -> bool:
        return item in self.outcomes

    def record(self, item: str, outcome: Outcome, reason: str = "") -> bool:
        if item in self.outcomes:
            return False
        self.outcomes[item] = outcome
        self.counts[outcome] += 1
        if outcome is Outcome.FAILED:
            self.failures.append((item, reason))
        self.updated = time.monotonic()
        return True

    def progress(self) -> RunProgress:
        return RunProgress(self.total, self.counts[Outcome.DONE], self.counts[Outcome.SKIPPED],
                           self.counts[Outcome.FAILED], list(self.failures), self.updated - self.started)


class RedisLedger:
    """The ledger of a queued run, shared by the enqueuing command, the workers and ``freesegdiff jobs``."""

    def __init__(self, connection: redis.Redis, run_id: str) -> None:
        self.connection, self.run_id = connection, run_id
        self.key = f"freeseg:run:{run_id}"
        self.outcomes_key = f"{self.key}:outcomes"
        self.failures_key = f"{self.key}:failures"
        self.jobs_key = f"{self.key}:jobs"
        self.memory_key = f"{self.key}:memory"
        self._record = connection.register_script(_RECORD_ONCE)

    @classmethod
    def create(cls, connection: redis.Redis, kind: str, target: str, total: int) -> RedisLedger:
        """A new run with a fresh id, listed in ``freeseg:runs``; its keys expire after seven days."""
        ledger = cls(connection, uuid.uuid4().hex[:12])
        now = time.time()
        with connection.pipeline() as pipeline:
            pipeline.hset(ledger.key, mapping={"kind": kind, "target": target, "total": total, "created": now,
                                               "done": 0, "skipped": 0, "failed": 0})
            pipeline.expire(ledger.key, RUN_TTL_SECONDS)
            pipeline.zadd(RUNS_KEY, {ledger.run_id: now})
            pipeline.zremrangebyscore(RUNS_KEY, 0, now - RUN_TTL_SECONDS)
            pipeline.execute()
        return ledger

    @staticmethod
    def recent(connection: redis.Redis, count: int = 10) -> list[str]:
        """The ids of the latest runs, newest first."""
        return [run.decode() for run in connection.zrevrange(RUNS_KEY, 0, count - 1)]

    def add_jobs(self, job_ids: list[str]) -> None:
        with self.connection.pipeline() as pipeline:
            pipeline.rpush(self.jobs_key, *job_ids)
            pipeline.hset(self.key, "chunks", len(job_ids))
            for key in (self.jobs_key, self.outcomes_key, self.failures_key):
                pipeline.expire(key, RUN_TTL_SECONDS)
            pipeline.execute()

    def job_ids(self) -> list[str]:
        return [job.decode() for job in self.connection.lrange(self.jobs_key, 0, -1)]

    def fields(self) -> dict[str, str]:
        """The run's hash, decoded; empty when there is no such run (or it expired)."""
        return {key.decode(): value.decode() for key, value in self.connection.hgetall(self.key).items()}

    def claim_model_version(self, model_version: str) -> str:
        """The run's model version: the first worker's, which every other worker must share."""
        self.connection.hsetnx(self.key, "model_version", model_version)
        return self.connection.hget(self.key, "model_version").decode()

    def begin(self) -> None:
        self.connection.hsetnx(self.key, "started", time.time())

    def claim_memory(self, read: Callable[[], bytes | None]) -> bytes | None:
        """The memory the run predicts with: what ``read`` gave its first chunk; None when that was none.
        Later chunks get that one even when the project's memory has changed since, so the whole run
        writes one model_version (a project shows the predictions of one version in its labeling stream)."""
        if not self.connection.exists(self.memory_key):
            self.connection.set(self.memory_key, read() or b"", nx=True, ex=RUN_TTL_SECONDS)
        return self.connection.get(self.memory_key) or None

    def release_memory(self) -> None:
        """Drop the run's copy of the memory (up to FREESEG_MEMORY_PROJECT_BYTES) once no chunk needs it."""
        self.connection.delete(self.memory_key)

    def settled(self, item: str) -> bool:
        return bool(self.connection.hexists(self.outcomes_key, item))

    def record(self, item: str, outcome: Outcome, reason: str = "") -> bool:
        stored = self._record(keys=[self.key, self.outcomes_key, self.failures_key],
                              args=[item, outcome.value, reason, time.time()])
        return bool(stored)

    def progress(self) -> RunProgress:
        fields = self.fields()
        stored = self.connection.hgetall(self.failures_key).items()
        failures = sorted(((item.decode(), reason.decode()) for item, reason in stored),
                          key=lambda failure: _natural(failure[0]))
        started, updated = float(fields.get("started", 0)), float(fields.get("updated", 0))
        return RunProgress(int(fields.get("total", 0)), int(fields.get("done", 0)), int(fields.get("skipped", 0)),
                           int(fields.get("failed", 0)), failures, max(updated - started, 0.0) if started else 0.0)


def _natural(item: str) -> tuple[int, int | str]:
    """Task ids in numeric order, then image paths in text order."""
    return (0, int(item)) if item.isdigit() else (1, item)
