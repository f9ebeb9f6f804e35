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
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from enum import Enum
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


class QueueFullError(RuntimeError):
    """The worker has ``capacity`` jobs already; try again later."""


class ModelsNotReadyError(RuntimeError):
    """The models are still loading, or failed to load (the message says which)."""


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
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=capacity)
        self._on_state, self._on_depth = on_state, on_depth
        self._pending = 0
        self._lock = threading.Lock()
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
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _cancel_queued(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
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

    def submit(self, work: Callable[[Segmenter], T]) -> Future[T]:
        """Queue ``work`` for the worker thread; raises at once when not ready or full."""
        return self._enqueue(_Job(work=work))

    def submit_encode(self, images: list[np.ndarray]) -> Future[list[Encoding]]:
        """Queue the encoding of ``images``; concurrent requests' images share the U-Net's batches."""
        return self._enqueue(_Job(images=images))

    def _enqueue(self, job: _Job[T]) -> Future[T]:
        self.ensure_ready()
        try:
            self._jobs.put_nowait(job)
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
        while (job := self._jobs.get()) is not None:
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
                job = self._jobs.get(timeout=max(deadline - time.monotonic(), 0))
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
