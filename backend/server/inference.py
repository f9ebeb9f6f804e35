"""One inference worker per process, behind a bounded queue.

The models are not thread-safe and one GPU runs one batch at a time, so a single thread
owns the segmenter and takes jobs from a queue of fixed capacity. Encode jobs of
concurrent requests are batched together (up to ``max_batch`` images, waiting at most
``max_wait_seconds`` for more), since the U-Net and captioner run batches far faster. When the queue is
full, callers are told at once (and answer 503 with Retry-After) instead of piling up
threads. Models download (when allowed) and load in the same thread at start, so the
server answers ``/health`` meanwhile; a request that comes then waits for them, up to
``load_wait_seconds`` (FREESEG_LOAD_WAIT_SECONDS), so that the tasks Label Studio sends
right after connecting get predictions.

The queue is ordered by ``Priority``: an annotator's request (one task, a click, a typed prompt)
is taken before a request of many tasks, and both before a background run's batches, so an
annotator waits at most for the job already running; jobs of one priority keep their order.
Beyond the queue, ``requests`` counts the requests in flight: a background run takes its next
step (a download, a job, a refinement) only when none is, so a request shares the cores with at
most one background step, not with the run's downloads, CRF processes and writes.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future
from enum import Enum, IntEnum
from typing import Generic, TypeVar

import numpy as np

from backend.pipeline.encoding import Encoding
from backend.pipeline.segmenter import Segmenter

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelState(str, Enum):
    """The models' state as ``/health`` and the metrics show it."""

    DOWNLOADING = "downloading"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class Priority(IntEnum):
    """Which queued job the worker takes first: the lowest value."""

    INTERACTIVE = 0  # one task, a click or a typed prompt: an annotator is waiting
    MULTI = 1  # a request of several tasks
    BACKGROUND = 2  # a batch of a background run (backend.server.background)


_STOP = -1  # the stop sentinel's priority: before any job


class QueueFullError(RuntimeError):
    """The worker has ``capacity`` jobs already; try again later."""


class ModelsNotReadyError(RuntimeError):
    """The models are still loading, or failed to load (the message says which)."""


class RequestsInFlight:
    """The requests being answered: background work waits until there are none (annotators first)."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Around a request's work: background steps wait while it lasts."""
        with self._changed:
            self._count += 1
        try:
            yield
        finally:
            with self._changed:
                self._count -= 1
                self._changed.notify_all()

    def wait_until_none(self) -> None:
        """Block while any request is being answered."""
        with self._changed:
            self._changed.wait_for(lambda: self._count == 0)


class _Job(Generic[T]):
    """Work for the segmenter; an encode job (``images`` set) may be batched with others."""

    def __init__(self, work: Callable[[Segmenter], T] | None = None, images: list[np.ndarray] | None = None):
        self.work, self.images = work, images
        self.future: Future[T] = Future()


class InferenceWorker:
    def __init__(self, load_segmenter: Callable[[], Segmenter], capacity: int,
                 on_state: Callable[[ModelState], None] = lambda state: None,
                 on_depth: Callable[[int], None] = lambda depth: None,
                 max_batch: int = 8, max_wait_seconds: float = 0.01,
                 download: Callable[[], object] | None = None, load_wait_seconds: float = 0.0):
        self._load_segmenter, self._download = load_segmenter, download
        self.load_wait_seconds = load_wait_seconds
        self._settled = threading.Event()  # set once the models are ready or failed
        self.max_batch, self.max_wait_seconds = max_batch, max_wait_seconds
        self._jobs: queue.PriorityQueue[tuple[int, int, _Job | None]] = queue.PriorityQueue(maxsize=capacity)
        self._order = itertools.count()  # FIFO within a priority; never compares two jobs
        self._on_state, self._on_depth = on_state, on_depth
        self._pending = 0
        self._lock = threading.Lock()
        self.requests = RequestsInFlight()  # background runs yield to them
        self.state = ModelState.DOWNLOADING if download else ModelState.LOADING
        self.error: str | None = None
        self.fingerprint = ""  # of the loaded models: part of every feature cache key
        self._segmenter: Segmenter | None = None
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> None:
        self._on_state(self.state)
        self._thread.start()

    def stop(self) -> None:
        """At shutdown: the jobs not yet started are cancelled, so only the running one delays the exit."""
        self._cancel_queued()
        self._jobs.put((_STOP, next(self._order), None))
        self._thread.join(timeout=30)

    def _cancel_queued(self) -> None:
        while True:
            try:
                _, _, job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.future.cancel()
                self._change_depth(-1)

    @property
    def depth(self) -> int:
        """Jobs waiting or running."""
        return self._pending

    def ensure_ready(self) -> None:
        """Raise ModelsNotReadyError unless the models are loaded."""
        if self.state != ModelState.READY:
            raise ModelsNotReadyError(self.error or f"models are {self.state.value}")

    def wait_until_loaded(self) -> None:
        """Block up to ``load_wait_seconds`` while the models download or load (not when failed)."""
        self._settled.wait(self.load_wait_seconds)

    def ensure_accepting(self) -> None:
        """Raise now what submitting would (not ready, queue full): callers check before costly work."""
        self.ensure_ready()
        if self._jobs.full():
            raise self._queue_full()

    def submit(self, work: Callable[[Segmenter], T], priority: Priority = Priority.MULTI) -> Future[T]:
        """Queue ``work`` for the worker thread; raises at once when not ready or full."""
        return self._enqueue(_Job(work=work), priority)

    def submit_encode(self, images: list[np.ndarray], priority: Priority = Priority.MULTI) -> Future[list[Encoding]]:
        """Queue the encoding of ``images``; concurrent requests' images share the U-Net's batches."""
        return self._enqueue(_Job(images=images), priority)

    def _enqueue(self, job: _Job[T], priority: Priority) -> Future[T]:
        self.ensure_ready()
        try:
            self._jobs.put_nowait((int(priority), next(self._order), job))
        except queue.Full:
            raise self._queue_full() from None
        self._change_depth(+1)
        return job.future

    def _queue_full(self) -> QueueFullError:
        return QueueFullError(f"{self._jobs.maxsize} inference jobs are already queued")

    def _change_depth(self, delta: int) -> None:
        with self._lock:
            self._pending += delta
            self._on_depth(self._pending)

    def _set_state(self, state: ModelState) -> None:
        self.state = state
        self._on_state(state)
        if state in (ModelState.READY, ModelState.FAILED):
            self._settled.set()

    def _run(self) -> None:
        try:
            if self._download is not None:
                self._download()
                self._set_state(ModelState.LOADING)
            segmenter = self._load_segmenter()
        except Exception as error:  # any failure to load must show on /health, not kill the server
            log.exception("models failed to load")
            self.error = f"models failed to load: {error}"
            self._set_state(ModelState.FAILED)
            return
        self.fingerprint, self._segmenter = segmenter.fingerprint, segmenter
        self._set_state(ModelState.READY)
        log.info("models ready")
        while (job := self._jobs.get()[2]) is not None:
            if job.images is None:
                self._run_jobs(segmenter, [job])
                continue
            encodes, others, stop = self._gather_encodes(job)
            self._run_encodes(segmenter, encodes)
            self._run_jobs(segmenter, others)
            if stop:
                return

    def _gather_encodes(self, first: _Job) -> tuple[list[_Job], list[_Job], bool]:
        """Dynamic batching: more encode jobs, until ``max_batch`` images or ``max_wait_seconds``."""
        encodes, others = [first], []
        deadline = time.monotonic() + self.max_wait_seconds
        while sum(len(j.images) for j in encodes) < self.max_batch:
            try:
                job = self._jobs.get(timeout=max(deadline - time.monotonic(), 0))[2]
            except queue.Empty:
                break
            if job is None:
                return encodes, others, True
            (encodes if job.images is not None else others).append(job)
        return encodes, others, False

    def _run_encodes(self, segmenter: Segmenter, jobs: list[_Job]) -> None:
        """The images of all jobs in batches of ``max_batch`` (smaller after running out of GPU memory)."""
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        images = [image for job in live for image in job.images]
        try:
            encodings = segmenter.encode_many(images, self.max_batch)
            for job in live:
                job.future.set_result(encodings[: len(job.images)])
                encodings = encodings[len(job.images) :]
        except Exception as error:  # handed to every waiting request of the batch
            for job in live:
                job.future.set_exception(error)
        finally:
            self._change_depth(-len(jobs))

    def _run_jobs(self, segmenter: Segmenter, jobs: list[_Job]) -> None:
        for job in jobs:
            try:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_result(job.work(segmenter))
            except Exception as error:  # handed to the waiting request
                job.future.set_exception(error)
            finally:
                self._change_depth(-1)
