"""Learning in the server's background: webhooks answer at once, events are kept, one thread learns.

Label Studio gives a webhook one second (``WEBHOOK_TIMEOUT``), sends it once and only logs a
failure, so ``/webhook`` and ``/train`` only hand the event over here, in memory, touching no store.
A keeper thread writes each event to the durable queue (``PendingEvents``: Redis, else files under
MODEL_DIR), retrying while the store is away; the learner thread applies the kept events in arrival
order and removes each once applied. A failure another try may mend (the store, a timeout, a 5xx
of Label Studio) keeps the event, tried again after a growing wait (``Backoff``, at most 30 s),
while the other events go on; any other failure gives the event up, logged. Events kept by a killed
process are applied after the restart. With several processes on one store, each applies the events
it accepted, and on start every event it finds: applying one twice is harmless (a learn replaces
what the annotation taught; deletes are checked with Label Studio).

Bounds: FREESEG_LEARN_QUEUE_SIZE events in all and FREESEG_LEARN_PROJECT_QUEUE_SIZE per project
(one project's flood cannot crowd out the others); beyond, an event is dropped, logged and counted
(a "Start Training" rebuilds everything). Outcomes are counted on ``/metrics`` as
``freeseg_learning_events``, never raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.backoff import Backoff, describe, is_transient
from backend.labelstudio.teacher import ProjectTeacher
from backend.server.learning_queue import LearningEvent, PendingEvents, event_name
from backend.server.prometheus import Metrics
from backend.storage.shared_store import StoreError

log = logging.getLogger(__name__)

LEARN_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
FORGET_ACTIONS = ("ANNOTATIONS_DELETED",)
TASKS_DELETED_ACTION = "TASKS_DELETED"
PROJECT_DELETED_ACTION = "PROJECT_DELETED"
TRAIN_ACTION = "START_TRAINING"


@dataclass(frozen=True)
class QueueBounds:
    """FREESEG_LEARN_QUEUE_SIZE and FREESEG_LEARN_PROJECT_QUEUE_SIZE: events waiting, in all and per project."""

    events: int
    per_project: int


def retryable(error: BaseException) -> bool:
    """Whether another try may apply the event: the store was away, or Label Studio timed out or failed."""
    return isinstance(error, StoreError) or is_transient(error)


class Learner:
    """Applies ``LearningEvent``s to a ``ProjectTeacher`` made once the models are up; ``access`` gives a
    project's Label Studio address and key when the event is applied (raising StoreError when unknown yet)."""

    def __init__(self, teacher: Callable[[], ProjectTeacher], access: Callable[[str], LabelStudioAccess],
                 pending: PendingEvents, bounds: QueueBounds, backoff: Backoff, metrics: Metrics) -> None:
        self._teacher, self._access, self._pending, self.bounds = teacher, access, pending, bounds
        self.backoff, self.metrics = backoff, metrics
        self._changed = threading.Condition()
        self._events: dict[str, LearningEvent] = {}  # accepted or resumed, neither applied nor given up
        self._per_project: Counter[str] = Counter()
        self._unsaved: deque[str] = deque()  # accepted, not yet in the store
        self._retries: dict[str, tuple[int, float]] = {}  # name -> (failures, monotonic time of the next try)
        self._stopping = False
        self._threads = [threading.Thread(target=self._keep, name="learning-keeper", daemon=True),
                         threading.Thread(target=self._learn, name="learner", daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop after the event being applied; kept events wait in the store for the next start."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def submit(self, event: LearningEvent) -> bool:
        """Accept ``event`` (in memory: the keeper stores it); False (logged, counted) beyond the bounds."""
        with self._changed:
            if len(self._events) >= self.bounds.events or self._per_project[event.project] >= self.bounds.per_project:
                log.warning("learning queue full (FREESEG_LEARN_QUEUE_SIZE=%d, FREESEG_LEARN_PROJECT_QUEUE_SIZE=%d, "
                            "project %s has %d waiting): %s dropped", self.bounds.events, self.bounds.per_project,
                            event.project, self._per_project[event.project], event.action)
                self._count(event, "dropped")
                return False
            name = event_name(event)
            self._track(name, event)
            self._unsaved.append(name)
            self._changed.notify_all()
            return True

    def join(self, timeout: float = 300.0) -> None:
        """Wait until every accepted event is applied or given up (tests); TimeoutError after ``timeout`` s."""
        with self._changed:
            if not self._changed.wait_for(lambda: not self._events, timeout):
                raise TimeoutError(f"{len(self._events)} learning events still waiting after {timeout} s")

    def _track(self, name: str, event: LearningEvent) -> None:
        self._events[name] = event
        self._per_project[event.project] += 1

    def _done(self, name: str) -> None:
        with self._changed:
            event = self._events.pop(name, None)
            self._retries.pop(name, None)
            if event is not None:
                self._per_project[event.project] -= 1
            self._changed.notify_all()

    def _keep(self) -> None:
        """Resume the store's events, then write each accepted one to it, waiting out a store that is away."""
        failures = 0
        resumed = False
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._stopping or not resumed or self._unsaved)
                if self._stopping and (failures or not resumed or not self._unsaved):
                    return  # a stop saves what was accepted, unless the store is away
            try:
                if not resumed:
                    self._resume()
                    resumed = True
                    continue
                name = self._unsaved[0]
                self._pending.add(name, self._events[name])
            except StoreError as error:
                failures += 1
                self._pause(self.backoff.wait(failures), f"the learning queue's store failed ({error})")
                continue
            failures = 0
            with self._changed:
                self._unsaved.popleft()
                self._changed.notify_all()

    def _resume(self) -> None:
        """The events a stopped or killed process kept: applied before the ones accepted since."""
        kept = [(name, event) for name, event in self._pending.all() if name not in self._events]
        with self._changed:
            for name, event in kept:
                self._track(name, event)
            self._changed.notify_all()
        if kept:
            log.info("resuming %d learning events kept in the store", len(kept))

    def _pause(self, seconds: float, why: str) -> None:
        log.warning("%s; trying again in %.1f s", why, seconds)
        with self._changed:
            self._changed.wait_for(lambda: self._stopping, seconds)

    def _next(self) -> tuple[str | None, float | None]:
        """The first stored event due now, else None and the seconds until one is due (None: none waits)."""
        now, soonest = time.monotonic(), None
        unsaved = set(self._unsaved)
        for name in sorted(self._events):
            if name in unsaved:
                continue
            due = self._retries.get(name, (0, now))[1]
            if due <= now:
                return name, None
            soonest = due - now if soonest is None else min(soonest, due - now)
        return None, soonest

    def _learn(self) -> None:
        while True:
            with self._changed:
                name, wait = self._next()
                while name is None and not self._stopping:
                    self._changed.wait(wait)
                    name, wait = self._next()
                if self._stopping:
                    return
                event = self._events[name]
            self._apply(name, event)

    def _apply(self, name: str, event: LearningEvent) -> None:
        try:
            outcome = self._handle(event)
            self._pending.remove(name)
        except Exception as error:  # learning is a by-product of annotating: logged and counted, never raised
            if retryable(error):
                with self._changed:
                    failures = self._retries.get(name, (0, 0.0))[0] + 1
                    wait = self.backoff.wait(failures)
                    self._retries[name] = (failures, time.monotonic() + wait)
                log.warning("project %s: %s of annotation %s failed (%s): kept, try %d in %.1f s", event.project,
                            event.action, event.annotation_id, describe(error), failures + 1, wait)
                self._count(event, "retried")
                return
            log.warning("project %s: %s of annotation %s failed, given up: %s", event.project, event.action,
                        event.annotation_id, describe(error))
            outcome = getattr(error, "kind", "failed")
            self._give_up(name)
        self._done(name)
        self._count(event, outcome)

    def _give_up(self, name: str) -> None:
        """Remove an event no retry can mend; if the store is away now, the next start tries it once more."""
        try:
            self._pending.remove(name)
        except StoreError as error:
            log.warning("learning event %s given up but still kept: %s", name, error)

    def _handle(self, event: LearningEvent) -> str:
        teacher, access = self._teacher(), self._access(event.project)
        if event.action == "rebuild":
            teacher.rebuild(event.project, access)
            return "done"
        if event.action == "forget":
            return "done" if teacher.forget(event.project, int(event.annotation_id), access) else "kept"
        if event.action == "forget-tasks":
            return "done" if teacher.forget_tasks(event.project, list(event.task_ids), access) else "kept"
        if event.action == "drop":
            return "done" if teacher.drop(event.project, access) else "kept"
        return "done" if teacher.learn(event.project, int(event.annotation_id), access) else "none"

    def _count(self, event: LearningEvent, outcome: str) -> None:
        self.metrics.learning_events.labels(action=event.action, outcome=outcome).inc()
