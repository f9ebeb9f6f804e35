"""``freesegdiff worker``: an RQ worker that loads the models once and works through chunks.

RQ's default ``Worker`` forks a work-horse per job: the models loaded in the parent would
be loaded again in every child (or, with CUDA, not work at all). ``SimpleWorker`` runs
jobs in its own process, so the models load once, at startup. What forking gave for free
is added back here:

- a heartbeat thread renews the running chunk's entry in RQ's ``StartedJobRegistry``
  every third of ``FREESEG_QUEUE_LEASE_SECONDS``, so a chunk whose worker was killed
  expires after one lease, however long chunks take (``SimpleWorker`` alone gives each
  entry the job's whole timeout plus a minute);
- expired chunks are handed to RQ's own cleanup (``StartedJobRegistry.cleanup``, under
  the queue's maintenance lock), which requeues a chunk with retries left and fails one
  without, and every worker looks for them once per lease (between chunks when busy);
- ``--burst`` quits only when no chunk is queued or running anywhere, so a burst worker
  outlives a dead one long enough to take over its chunk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from backend.jobs.queue import job_queue
from backend.storage.backing import runs_redis
from backend.models.process import process_segmenter
from backend.models.identity import model_version
from backend.settings import Settings

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 1.0  # how often a burst worker with nothing to do looks for abandoned chunks


class ChunkWorker(SimpleWorker):
    """A ``SimpleWorker`` whose running chunk stays leased while its process lives (see the module's text)."""

    def __init__(self, queues: list[Queue], lease_seconds: int, **kwargs: object) -> None:
        super().__init__(queues, serializer=JSONSerializer, worker_ttl=lease_seconds + 15,
                         maintenance_interval=lease_seconds, **kwargs)
        self.lease_seconds = lease_seconds
        self._beating: threading.Event | None = None

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.lease_seconds

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        with self._heartbeats(job, execution):
            self.perform_job(job, queue, execution)
        self.set_state(WorkerStatus.IDLE)

    @contextmanager
    def _heartbeats(self, job: Job, execution: Execution) -> Iterator[None]:
        stop = self._beating = threading.Event()
        thread = threading.Thread(target=self._beat, args=(job, execution, stop), name="chunk-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _beat(self, job: Job, execution: Execution, stop: threading.Event) -> None:
        while not stop.wait(self.lease_seconds / 3):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:  # a missed beat is tried again; the chunk must go on
                log.warning("chunk %s: heartbeat failed; trying again in %.0f s", job.id, self.lease_seconds / 3,
                            exc_info=True)

    def cleanup_execution(self, job: Job, pipeline: object, execution: Execution | None = None) -> None:
        if self._beating is not None:
            self._beating.set()  # no later beat renews the execution RQ is about to remove
        super().cleanup_execution(job, pipeline, execution)

    def run_maintenance_tasks(self) -> None:
        self.requeue_abandoned()
        super().run_maintenance_tasks()

    def requeue_abandoned(self) -> None:
        """Hand chunks whose lease expired to RQ's cleanup: requeued while they have retries, failed after."""
        for queue in self.queues:
            registry = queue.started_job_registry
            expired = registry.get_expired_job_ids()
            if not expired or not queue.acquire_maintenance_lock():
                continue
            try:
                for job in Job.fetch_many(expired, connection=self.connection, serializer=JSONSerializer):
                    if job is not None and job.get_status(refresh=False) == JobStatus.STARTED:
                        log.warning("chunk %s: its worker sent no heartbeat for %d s (killed or cut off): %s",
                                    job.id, self.lease_seconds,
                                    f"requeued, {job.retries_left - 1} retries left" if job.retries_left
                                    else "no retries left, failed")
                registry.cleanup(exception_handlers=self._exc_handlers)
            finally:
                queue.release_maintenance_lock()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None,
                                     max_idle_time: int | None = None) -> tuple[Job, Queue] | None:
        """In burst mode (``timeout`` None), wait while chunks run elsewhere: one may come back."""
        while True:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            if result is not None or timeout is not None or not self._chunks_running():
                return result
            time.sleep(IDLE_POLL_SECONDS)
            self.requeue_abandoned()

    def _chunks_running(self) -> bool:
        return any(queue.started_job_registry.get_job_count(cleanup=False) for queue in self.queues)


def run_worker(settings: Settings, burst: bool) -> None:
    """Load the models, then work on ``FREESEG_QUEUE_NAME`` until stopped (``burst``: until no chunk is left)."""
    connection = runs_redis(settings)
    process_segmenter(settings)
    log.info("models loaded (%s); working on queue %s", model_version(settings), settings.queue_name)
    worker = ChunkWorker([job_queue(connection, settings)], settings.queue_lease_seconds, connection=connection)
    worker.work(burst=burst, logging_level=settings.log_level.upper())
