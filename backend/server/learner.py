"""Learning in the server's background: webhooks answer at once, one thread learns, in order.

Label Studio gives a webhook one second (``WEBHOOK_TIMEOUT``) and waits for "Start
Training" about as long as for a prediction, and only logs a failure, so ``/webhook`` and
``/train`` only queue the work here. The queue is bounded (FREESEG_LEARN_QUEUE_SIZE): when it
is full an event is dropped, logged and counted (a "Start Training" rebuilds everything).
Failures are logged and counted on ``/metrics`` as ``freeseg_learning_events``, never raised.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.backoff import describe
from backend.labelstudio.learning import ProjectTeacher
from backend.server.metrics import Metrics

log = logging.getLogger(__name__)

LEARN_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
FORGET_ACTIONS = ("ANNOTATIONS_DELETED",)
TASKS_DELETED_ACTION = "TASKS_DELETED"
PROJECT_DELETED_ACTION = "PROJECT_DELETED"
TRAIN_ACTION = "START_TRAINING"


@dataclass(frozen=True)
class LearningEvent:
    """One thing to learn: ``action`` of a project, with the annotation or the tasks it names.

    Actions: ``learn`` and ``forget`` (an annotation), ``forget-tasks`` (``task_ids``), ``drop`` (the
    project was deleted) and ``rebuild``.
    """

    action: str
    project: str
    access: LabelStudioAccess
    annotation_id: int | None = None
    task_ids: tuple[int, ...] = ()


class Learner:
    """One background thread applying ``LearningEvent``s to a ``ProjectTeacher`` made once the models are up."""

    def __init__(self, teacher: Callable[[], ProjectTeacher], capacity: int, metrics: Metrics) -> None:
        self._teacher, self.metrics = teacher, metrics
        self._events: queue.Queue[LearningEvent | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="learner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._events.put(None)
        self._thread.join(timeout=30)

    def submit(self, event: LearningEvent) -> bool:
        """Queue ``event``; False (logged, counted) when the queue is full."""
        try:
            self._events.put_nowait(event)
            return True
        except queue.Full:
            log.warning("learning queue full (FREESEG_LEARN_QUEUE_SIZE=%d): %s of project %s dropped",
                        self._events.maxsize, event.action, event.project)
            self._count(event, "dropped")
            return False

    def join(self) -> None:
        """Wait until every queued event is handled (tests and shutdown)."""
        self._events.join()

    def _run(self) -> None:
        while (event := self._events.get()) is not None:
            try:
                self._handle(event)
            finally:
                self._events.task_done()
        self._events.task_done()

    def _handle(self, event: LearningEvent) -> None:
        try:
            teacher = self._teacher()
            if event.action == "rebuild":
                teacher.rebuild(event.project, event.access)
                outcome = "done"
            elif event.action == "forget":
                outcome = "done" if teacher.forget(event.project, int(event.annotation_id), event.access) else "kept"
            elif event.action == "forget-tasks":
                outcome = "done" if teacher.forget_tasks(event.project, list(event.task_ids), event.access) else "kept"
            elif event.action == "drop":
                outcome = "done" if teacher.drop(event.project, event.access) else "kept"
            else:
                outcome = "done" if teacher.learn(event.project, int(event.annotation_id), event.access) else "none"
        except Exception as error:  # learning is a by-product of annotating: logged and counted, never raised
            log.warning("project %s: %s of annotation %s failed: %s", event.project, event.action,
                        event.annotation_id, describe(error))
            outcome = getattr(error, "kind", "failed")
        self._count(event, outcome)

    def _count(self, event: LearningEvent, outcome: str) -> None:
        self.metrics.learning_events.labels(action=event.action, outcome=outcome).inc()
