"""One inference worker per process, behind a bounded queue.

The models are not thread-safe and one GPU runs one batch at a time, so a single thread
owns the segmenter and takes jobs from a queue of fixed capacity. When the queue is
full, callers are told at once (and answer 503 with Retry-After) instead of piling up
threads. Models load in the same thread at start, so the server answers ``/health``
while they load.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

from backend.pipeline.segmenter import Segmenter

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The worker has ``capacity`` jobs already; try again later."""


class ModelsNotReadyError(RuntimeError):
    """The models are still loading, or failed to load (the message says which)."""


class _Job(Generic[T]):
    def __init__(self, work: Callable[[Segmenter], T]):
        self.work = work
        self.future: Future[T] = Future()


class InferenceWorker:
    def __init__(self, load_segmenter: Callable[[], Segmenter], capacity: int,
                 on_state: Callable[[str], None] = lambda state: None,
                 on_depth: Callable[[int], None] = lambda depth: None):
        self._load_segmenter = load_segmenter
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=capacity)
        self._on_state, self._on_depth = on_state, on_depth
        self._pending = 0
        self._lock = threading.Lock()
        self.state = "loading"
        self.error: str | None = None
        self.fingerprint = ""  # of the loaded models: part of every feature cache key
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> None:
        self._on_state(self.state)
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    @property
    def depth(self) -> int:
        """Jobs waiting or running."""
        return self._pending

    def ensure_ready(self) -> None:
        """Raise ModelsNotReadyError unless the models are loaded."""
        if self.state != "ready":
            raise ModelsNotReadyError(self.error or "models are loading")

    def submit(self, work: Callable[[Segmenter], T]) -> Future[T]:
        """Queue ``work`` for the worker thread; raises at once when not ready or full."""
        self.ensure_ready()
        job = _Job(work)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"{self._jobs.maxsize} inference jobs are already queued") from None
        self._change_depth(+1)
        return job.future

    def _change_depth(self, delta: int) -> None:
        with self._lock:
            self._pending += delta
            self._on_depth(self._pending)

    def _set_state(self, state: str) -> None:
        self.state = state
        self._on_state(state)

    def _run(self) -> None:
        try:
            segmenter = self._load_segmenter()
        except Exception as error:  # any failure to load must show on /health, not kill the server
            log.exception("models failed to load")
            self.error = f"models failed to load: {error}"
            self._set_state("failed")
            return
        self.fingerprint = segmenter.fingerprint
        self._set_state("ready")
        log.info("models ready")
        while (job := self._jobs.get()) is not None:
            try:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_result(job.work(segmenter))
            except Exception as error:  # handed to the waiting request
                job.future.set_exception(error)
            finally:
                self._change_depth(-1)
