"""The feedback log: how annotators corrected our pre-annotations, one plain record per task.

A ``LabelFeedback`` says how one label fared (the IoU of the predicted and annotated masks, and
whether the annotator kept, edited, deleted or added it); a ``FeedbackRecord`` holds those of one
task. A ``FeedbackStore`` keeps records per project (a Redis list, or a JSON-lines file), as plain
JSON, never pickle, so reading a record back cannot run code. Comparing a prediction with its
annotation, and summing records up, is Label Studio's side (``backend.labelstudio.corrections``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from backend.storage.redis_client import STORE_TIMEOUT_SECONDS, RedisCalls
from backend.storage.shared_store import StoreError, safe_name

log = logging.getLogger(__name__)

KEPT, EDITED, DELETED, ADDED = "kept", "edited", "deleted", "added"
OUTCOMES = (KEPT, EDITED, DELETED, ADDED)

REDIS_KEY_PREFIX = "freeseg:feedback"


class FeedbackStoreError(StoreError):
    """The feedback store could not be read or written (Redis down, disk full, ...); ``kind`` is ``store``."""


@dataclass(frozen=True)
class LabelFeedback:
    """How one label of one task fared: IoU of prediction vs annotation, and the outcome."""

    label: str
    iou: float
    outcome: str  # "kept" | "edited" | "deleted" | "added"

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {self.outcome!r}")
        if not 0.0 <= self.iou <= 1.0:
            raise ValueError(f"iou must be within [0, 1], not {self.iou!r}")


@dataclass(frozen=True)
class FeedbackRecord:
    """The feedback of one annotated task; ``timestamp`` is in seconds since the epoch (UTC)."""

    project: str
    task: int
    timestamp: float
    model_version: str
    labels: tuple[LabelFeedback, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))  # a list would make the record unhashable
        if not math.isfinite(self.timestamp):
            raise ValueError(f"timestamp must be finite, not {self.timestamp!r}")

    def to_json(self) -> str:
        """One line of JSON (no newline inside, so it fits a JSON-lines file)."""
        return json.dumps({
            "project": self.project,
            "task": self.task,
            "timestamp": self.timestamp,
            "model_version": self.model_version,
            "labels": [{"label": f.label, "iou": f.iou, "outcome": f.outcome} for f in self.labels],
        })

    @classmethod
    def from_json(cls, text: str | bytes) -> FeedbackRecord:
        """The record ``to_json`` wrote; ``ValueError`` for anything else."""
        try:
            data = json.loads(text)
            return cls(
                project=_typed(data["project"], str),
                task=_typed(data["task"], int),
                timestamp=float(_typed(data["timestamp"], (int, float))),
                model_version=_typed(data["model_version"], str),
                labels=tuple(
                    LabelFeedback(_typed(item["label"], str), float(_typed(item["iou"], (int, float))),
                                  _typed(item["outcome"], str))
                    for item in _typed(data["labels"], list)
                ),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a feedback record: {error!r}") from error


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    """``value`` if it is a ``kind`` (bools are not numbers here), else ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"expected {kind}, got {value!r}")
    return value


# --- stores -------------------------------------------------------------------------------------


class FeedbackStore(Protocol):
    """Where feedback records are kept, per project, in the order they were added."""

    def add(self, record: FeedbackRecord) -> None: ...

    def records(self, project: str) -> list[FeedbackRecord]: ...


def checked_project(project: str) -> str:
    """``project`` if it is a safe name (the shared store's ``safe_name``), else ``ValueError``.

    Project names become file names and key suffixes: nothing that could leave the folder. Both
    stores apply it, so a project that works with one works with the other.
    """
    if not safe_name(project):
        raise ValueError(f"project name must match [A-Za-z0-9._-]+, not {project!r}")
    return project


def _parse_records(lines: Iterable[str | bytes], where: str) -> list[FeedbackRecord]:
    """The readable records; one torn or foreign entry must not hide all the others."""
    records = []
    for line in lines:
        try:
            records.append(FeedbackRecord.from_json(line))
        except ValueError as error:
            log.warning("skipping an unreadable feedback entry in %s: %s", where, error)
    return records


class RedisFeedbackStore:
    """A Redis list per project, ``freeseg:feedback:<project>``, one JSON record per item (RPUSH)."""

    def __init__(self, url: str, timeout_seconds: float = STORE_TIMEOUT_SECONDS) -> None:
        self._redis = RedisCalls(url, timeout_seconds, "Redis feedback store", FeedbackStoreError)

    def add(self, record: FeedbackRecord) -> None:
        self._redis(self._redis.client.rpush, self.key(record.project), record.to_json())

    def records(self, project: str) -> list[FeedbackRecord]:
        key = self.key(project)
        return _parse_records(self._redis(self._redis.client.lrange, key, 0, -1), f"{self._redis.where} {key}")

    @staticmethod
    def key(project: str) -> str:
        return f"{REDIS_KEY_PREFIX}:{checked_project(project)}"


class FileFeedbackStore:
    """One JSON-lines file per project, ``<folder>/feedback-<project>.jsonl``.

    Appends hold an exclusive ``flock`` on the file and reads a shared one, so processes and
    threads sharing the folder neither interleave lines nor read half of one (POSIX only).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, project: str) -> Path:
        return self.folder / f"feedback-{checked_project(project)}.jsonl"

    def add(self, record: FeedbackRecord) -> None:
        path = self.path(record.project)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as file:
                fcntl.flock(file, fcntl.LOCK_EX)  # released when the file is closed
                file.write(record.to_json() + "\n")
        except OSError as error:
            raise FeedbackStoreError(f"cannot append feedback to {path}: {error}") from error

    def records(self, project: str) -> list[FeedbackRecord]:
        path = self.path(project)
        try:
            with path.open("rb") as file:
                fcntl.flock(file, fcntl.LOCK_SH)
                lines = [line for line in file.read().splitlines() if line.strip()]
        except FileNotFoundError:
            return []
        except OSError as error:
            raise FeedbackStoreError(f"cannot read feedback from {path}: {error}") from error
        return _parse_records(lines, str(path))

