"""Runs as Redis Queue jobs: chunks enqueued as JSON, their progress followed from Redis.

Nothing crossing Redis is pickled: the queue, its jobs and the workers use RQ's
``JSONSerializer``, jobs name their function by dotted path and take JSON arguments
``(run_id, items, **options)``, ``items`` being task ids or image paths. Label Studio's
address and key never go through Redis: each worker reads its own settings.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import redis
from rq import Queue, Retry, get_current_job
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.storage.job_ledger import RUN_TTL_SECONDS, Outcome, RedisLedger, RunProgress
from backend.jobs.progress import RunBar
from backend.settings import Settings, get_settings

log = logging.getLogger(__name__)

ENDED = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})
POLL_SECONDS = 0.5
STATE_CHECK_SECONDS = 5.0  # how often a waiting run also reads its jobs' states


def job_queue(connection: redis.Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)


def enqueue_chunks(queue: Queue, ledger: RedisLedger, function: str, items: list, options: dict,
                   settings: Settings) -> list[str]:
    """Cut ``items`` into chunks of ``queue_chunk_size`` and enqueue one job per chunk."""
    size = settings.queue_chunk_size
    retry = Retry(max=settings.queue_retries) if settings.queue_retries else None
    jobs = [
        Queue.prepare_data(function, args=[ledger.run_id, items[start:start + size]], kwargs=options,
                           job_id=f"{ledger.run_id}-{index:05d}", timeout=settings.queue_chunk_timeout,
                           result_ttl=RUN_TTL_SECONDS, failure_ttl=RUN_TTL_SECONDS, retry=retry,
                           description=f"run {ledger.run_id}: {len(items[start:start + size])} items from {start}")
        for index, start in enumerate(range(0, len(items), size))
    ]
    job_ids = [job.job_id for job in jobs]
    if job_ids:
        ledger.add_jobs(job_ids)  # before the jobs exist, so that a worker never sees a chunk of an unknown run
        queue.enqueue_many(jobs)
    return job_ids


@dataclass(frozen=True)
class ChunkContext:
    """What a chunk job needs from the worker that runs it."""

    settings: Settings
    connection: redis.Redis
    ledger: RedisLedger

    def begin(self, version: str) -> None:
        """Start the chunk, whose results carry ``version``; refuses a run whose other workers use other models."""
        claimed = self.ledger.claim_model_version(version)
        if claimed != version:
            raise RuntimeError(f"this worker's model version {version} is not the run's {claimed}: "
                               "run every worker of a run with the same models, device and feature settings")
        self.ledger.begin()


def chunk_context(run_id: str) -> ChunkContext:
    """The running job's context: this worker's settings, and the run's ledger on the job's Redis."""
    connection = get_current_job().connection
    return ChunkContext(get_settings(), connection, RedisLedger(connection, run_id))


def job_states(connection: redis.Redis, job_ids: list[str]) -> Counter[str]:
    """How many of the jobs are queued, started, finished, failed, ... (``missing`` once expired)."""
    with connection.pipeline() as pipeline:
        for job_id in job_ids:
            pipeline.hget(Job.key_for(job_id), "status")
        statuses = pipeline.execute()
    return Counter(status.decode() if status else "missing" for status in statuses)


def wait_for_run(queue: Queue, ledger: RedisLedger, progress: bool = True, unit: str = "task") -> RunProgress:
    """Follow the run until every item is settled, or every chunk has ended (a failed one's items fail)."""
    with RunBar(ledger.progress().total, f"run {ledger.run_id}", progress, unit) as bar:
        checked = time.monotonic()
        while True:
            current = ledger.progress()
            bar.show(current)
            if current.complete:
                return current
            if time.monotonic() - checked >= STATE_CHECK_SECONDS:
                checked = time.monotonic()
                if _chunks_ended(queue, ledger):
                    _settle_failed_chunks(queue, ledger)
                    return ledger.progress()
            time.sleep(POLL_SECONDS)


def _chunks_ended(queue: Queue, ledger: RedisLedger) -> bool:
    states = job_states(queue.connection, ledger.job_ids())
    return all(state in ENDED or state == "missing" for state in states)


def _settle_failed_chunks(queue: Queue, ledger: RedisLedger) -> None:
    """The items of chunks that failed for good (retries spent) fail with the chunk's error."""
    for job in Job.fetch_many(ledger.job_ids(), connection=queue.connection, serializer=JSONSerializer):
        if job is None or job.get_status(refresh=False) not in ENDED - {JobStatus.FINISHED}:
            continue
        error = (job.exc_info or job.get_status(refresh=False).value).strip().splitlines()[-1]
        for item in job.args[1]:
            ledger.record(str(item), Outcome.FAILED, f"chunk {job.id} failed: {error}")
