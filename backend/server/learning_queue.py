"""Learning events kept until they are applied: in the shared store (Redis, else files under MODEL_DIR).

A webhook is sent once: an event held only in a process's memory is lost when the process is
killed, and one that failed while the store or Label Studio was away was never tried again.
So each accepted event is written to the shared store (``SharedStore``: Redis when REDIS_URL is
set, else one small file per event under ``MODEL_DIR/learning``), as JSON, never pickle, and
removed only once it was applied or given up. Names sort in arrival order; an event carries no
Label Studio token: the learner reads the project's access when it applies the event.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass

from backend.storage.shared_store import SharedStore

log = logging.getLogger(__name__)

NAMESPACE = "learning"
_PREFIX = "e"  # every event name starts with it: the store lists names by a non-empty prefix


@dataclass(frozen=True)
class LearningEvent:
    """One thing to learn: ``action`` of a project, with the annotation or the tasks it names.

    Actions: ``learn`` and ``forget`` (an annotation), ``forget-tasks`` (``task_ids``), ``drop`` (the
    project was deleted) and ``rebuild``.
    """

    action: str
    project: str
    annotation_id: int | None = None
    task_ids: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        """How many annotations or tasks it names (at least one): what FREESEG_LEARN_EVENTS_PER_REQUEST counts."""
        return max(1, len(self.task_ids))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LearningEvent:
        value = json.loads(data)
        annotation_id = value.get("annotation_id")
        return cls(str(value["action"]), str(value["project"]),
                   None if annotation_id is None else int(annotation_id),
                   tuple(int(task) for task in value.get("task_ids") or ()))


def event_name(event: LearningEvent) -> str:
    """A new event's store name: arrival time first, so that sorted names are arrival order."""
    return f"{_PREFIX}{time.time_ns():020d}-{event.project}-{uuid.uuid4().hex[:8]}"


class PendingEvents:
    """The events not yet applied, by name, in a ``SharedStore`` (keys ``learning:<name>``)."""

    def __init__(self, store: SharedStore) -> None:
        self.store = store

    def add(self, name: str, event: LearningEvent) -> None:
        """Keep ``event``; raises StoreError when the store is unreachable."""
        self.store.put(f"{NAMESPACE}:{name}", event.to_json())

    def remove(self, name: str) -> None:
        self.store.delete(f"{NAMESPACE}:{name}")

    def all(self) -> list[tuple[str, LearningEvent]]:
        """Every kept event in arrival order; an unreadable one is removed, logged. Raises StoreError."""
        events = []
        for name in self.store.names(NAMESPACE, _PREFIX):
            data = self.store.get(f"{NAMESPACE}:{name}")
            if data is None:
                continue  # applied by another process since it was listed
            try:
                events.append((name, LearningEvent.from_json(data)))
            except (ValueError, TypeError, KeyError) as error:
                log.warning("learning event %s is unreadable, removed: %s", name, error)
                self.remove(name)
        return events
