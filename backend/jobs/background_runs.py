"""Background runs: ``annotate-project``'s engine, started by a /predict of more tasks than fit its budget.

The same ``TaskAnnotator`` as ``freesegdiff annotate-project``: each task's prediction is written through
Label Studio's API with the project's context (vocabulary, options with ``extra_params``, memory,
``model_version``), after the per-task check that it has none of that version yet; so a run started
again after a kill writes nothing twice. With REDIS_URL the tasks go onto the queue in chunks, exactly
like ``annotate-project --queue``, for ``freesegdiff worker`` processes; without it, the server runs them
here, in a thread that hands each batch to the server's inference worker at background priority.

Every run has a record in the shared store (``backend.storage.run_registry``): ``GET /jobs`` and
``freesegdiff jobs`` list them, ``DELETE /jobs/{id}`` and ``freesegdiff jobs --cancel`` stop them. A local
run's owner writes its counts and a heartbeat every ``HEARTBEAT_SECONDS`` and logs a line meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.jobs.locks import NoLocks
from backend.jobs.project import BatchSegmenter, ProjectRun, TaskAnnotator, annotate_project_queued
from backend.jobs.queue import ENDED, job_states
from backend.labelstudio.client import LabelStudioProject
from backend.settings import Settings
from backend.storage.cached_encoder import CachedEncoder
from backend.storage.job_ledger import ProcessLedger, RedisLedger, RunProgress
from backend.storage.run_registry import ACTIVE_STATES, RunRecord, RunRegistry

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0  # how often a local run's owner writes its counts and logs its progress
_WAITING = frozenset({JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED})


class RunCancelled(Exception):
    """Raised between batches of a run asked to stop."""


def with_progress(record: RunRecord, progress: RunProgress, **changes: object) -> RunRecord:
    return dataclasses.replace(record, done=progress.done, skipped=progress.skipped, failed=progress.failed,
                               failures=[list(failure) for failure in progress.failures], seconds=progress.seconds,
                               **changes)


class LocalRun:
    """One run in this process: its ledger, and the flag that stops it after the current batch."""

    def __init__(self, record: RunRecord, run: ProjectRun, segmenter: BatchSegmenter, encoder: CachedEncoder,
                 settings: Settings, registry: RunRegistry) -> None:
        self.record, self.registry = record, registry
        self.ledger = ProcessLedger(record.total)
        self.annotator = TaskAnnotator(run, segmenter, encoder, settings, self.ledger, NoLocks())
        self.cancelled = threading.Event()
        self.ended = threading.Event()

    def run(self) -> None:
        self.report(state="running")
        try:
            self.annotator.annotate(self.record.task_ids, after_batch=self._stop_if_cancelled)
            state, reason = "done", ""
        except RunCancelled:
            state, reason = "cancelled", ""
        except Exception as error:  # models gone, the worker stopped: the run fails, the server goes on
            log.exception("background run %s failed", self.record.id)
            state, reason = "failed", f"{type(error).__name__}: {error}"
        self.report(state=state, reason=reason)
        self.ended.set()
        progress = self.ledger.progress()
        log.info("background run %s of project %s %s: %d tasks, %d done, %d skipped, %d failed in %.1f s",
                 self.record.id, self.record.project, state, progress.total, progress.done, progress.skipped,
                 progress.failed, progress.seconds)

    def _stop_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise RunCancelled(self.record.id)

    def report(self, **changes: object) -> None:
        """Write the counts and a heartbeat; take up a cancel another process asked for."""
        progress = self.ledger.progress()
        record = self.registry.update(self.record.id, lambda record: with_progress(
            record, progress, heartbeat=time.time(), **changes))
        if record is not None and record.cancel:
            self.cancelled.set()

    def view(self) -> RunRecord:
        """The record with this moment's counts."""
        return with_progress(self.record, self.ledger.progress(), state="running", heartbeat=time.time())


class LocalRuns:
    """This process's local runs: each in its own thread; one more thread writes their heartbeats and logs."""

    def __init__(self, registry: RunRegistry) -> None:
        self.registry = registry
        self.runs: dict[str, LocalRun] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    def start(self, run: LocalRun) -> None:
        with self._lock:
            self.runs[run.record.id] = run
            if self._monitor is None:
                self._monitor = threading.Thread(target=self._beat, name="background-runs", daemon=True)
                self._monitor.start()
        threading.Thread(target=run.run, name=f"background-{run.record.id}", daemon=True).start()

    def cancel(self, run_id: str) -> bool:
        """Stop the run after its current batch, when it is this process's."""
        run = self.runs.get(run_id)
        if run is not None:
            run.cancelled.set()
        return run is not None

    def live(self, run_id: str) -> LocalRun | None:
        run = self.runs.get(run_id)
        return run if run is not None and not run.ended.is_set() else None

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                for run_id, run in list(self.runs.items()):
                    if run.ended.is_set():
                        del self.runs[run_id]
            for run in list(self.runs.values()):
                try:
                    run.report()
                except Exception as error:  # the store away: the run goes on, the next beat tries again
                    log.warning("background run %s: its progress could not be written: %s", run.record.id, error)
                progress = run.ledger.progress()
                log.info("background run %s of project %s: %d of %d tasks settled (%d done, %d skipped, %d failed), "
                         "%.2f tasks/s", run.record.id, run.record.project, progress.settled, progress.total,
                         progress.done, progress.skipped, progress.failed, progress.per_second)


def start_queued(record: RunRecord, project: LabelStudioProject, settings: Settings, registry: RunRegistry) -> None:
    """The run's tasks onto the Redis queue in chunks, as ``annotate-project --queue --no-wait`` does."""
    result = annotate_project_queued(project, settings, overwrite=False, wait=False, progress=False,
                                     task_ids=record.task_ids)
    registry.update(record.id, lambda found: dataclasses.replace(found, queue_run=result.run_id or ""))
    log.info("background run %s of project %s: %d tasks queued as run %s on queue %s", record.id, record.project,
             record.total, result.run_id, settings.queue_name)


def current(record: RunRecord, connection: redis.Redis | None, local: LocalRuns | None = None) -> RunRecord:
    """The record as the run is now: a local run of this process from its ledger, a lost one queued (for the
    next server to take up), a queued one from its ledger and chunks in Redis."""
    live = local.live(record.id) if local is not None else None
    if live is not None:
        return dataclasses.replace(live.view(), cancel=record.cancel)
    if record.lost(time.time()):
        return (dataclasses.replace(record, state="cancelled") if record.cancel else dataclasses.replace(
            record, state="queued", reason="its server stopped before the run ended: the next server with its "
            "model_version takes it up"))
    if record.mode != "queued" or connection is None or not record.queue_run:
        return record
    ledger = RedisLedger(connection, record.queue_run)
    states = job_states(connection, ledger.job_ids())
    progress = ledger.progress()
    ended = progress.complete or all(state in ENDED or state == "missing" for state in states)
    state = ("cancelled" if record.cancel else "done" if ended else
             "running" if states[JobStatus.STARTED.value] or progress.settled else "queued")
    return with_progress(record, progress, state=state)


def active(record: RunRecord, connection: redis.Redis | None) -> bool:
    """Whether the run still holds its tasks (another request for them adds no work)."""
    return not record.cancel and current(record, connection).state in ACTIVE_STATES


def cancel(registry: RunRegistry, run_id: str, connection: redis.Redis | None,
           local: LocalRuns | None = None) -> RunRecord | None:
    """Ask the run to stop: a local run after its current batch (its owner reads the request within a
    heartbeat), a queued run's waiting chunks now; an ended run is left as it is. Its record as it is then;
    None when there is no such run."""
    record = registry.get(run_id)
    if record is None or current(record, connection, local).state not in ACTIVE_STATES:
        return record and current(record, connection, local)
    registry.request_cancel(run_id)
    if local is not None:
        local.cancel(run_id)
    if record.mode == "queued" and connection is not None and record.queue_run:
        jobs = Job.fetch_many(RedisLedger(connection, record.queue_run).job_ids(), connection=connection,
                              serializer=JSONSerializer)
        for job in jobs:
            if job is not None and job.get_status(refresh=False) in _WAITING:
                job.cancel()
        registry.update(run_id, lambda found: dataclasses.replace(found, state="cancelled"))
    log.info("background run %s of project %s: cancelled", run_id, record.project)
    return current(registry.get(run_id), connection, local)


def described(record: RunRecord) -> dict:
    """What ``GET /jobs`` lists of a run (``current``'s record)."""
    settled = record.done + record.skipped + record.failed
    per_second = settled / record.seconds if record.seconds > 0 else 0.0
    left = (record.total - settled) / per_second if per_second > 0 and record.state in ACTIVE_STATES else None
    return {"id": record.id, "project": record.project, "model_version": record.model_version, "mode": record.mode,
            "state": record.state, "total": record.total, "done": record.done, "skipped": record.skipped,
            "failed": record.failed, "failures": [{"task": int(task), "reason": reason}
                                                  for task, reason in record.failures],
            "tasks_per_second": round(per_second, 3), "seconds_left": None if left is None else round(left, 1),
            "created": record.created, "queue_run": record.queue_run or None, "reason": record.reason or None}
