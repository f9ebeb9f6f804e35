"""How good was the pre-annotation? Compare our brush prediction with the annotator's correction.

``compare`` turns one task's prediction and final annotation into one ``LabelFeedback`` per label:
the IoU of the predicted and annotated masks and what the annotator did with it (kept, edited,
deleted, added). A ``FeedbackRecord`` holds those for one task; a ``FeedbackStore`` keeps records
per project (a Redis list when Redis is configured, else a JSON-lines file), as plain JSON, never
pickle, so reading a record back cannot run code. ``summarize`` aggregates them per label.

Only ``brushlabels`` results with RLE masks are compared; polygons and every other result type are
ignored, and so are brush regions without a label. Regions are matched by ``from_name`` and label:
all regions of one label under one ``from_name`` are OR-ed into one mask, so splitting or merging
regions is not an edit.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from backend.labelstudio.annotations import MAX_BRUSH_PIXELS, decode_brush

from backend.storage.shared_store import RedisCalls

log = logging.getLogger(__name__)

# An IoU at least this high counts as accepted unchanged: brush round trips and a stray click
# in the editor move a pixel or two without the annotator meaning to change the region.
KEPT_IOU = 0.99

KEPT, EDITED, DELETED, ADDED = "kept", "edited", "deleted", "added"
OUTCOMES = (KEPT, EDITED, DELETED, ADDED)

REDIS_KEY_PREFIX = "freeseg:feedback"
# Project names become file names and key suffixes: nothing that could leave the folder.
_PROJECT_NAME = re.compile(r"[A-Za-z0-9._-]+")

_Key = tuple[str, str]  # (from_name, label)


class FeedbackStoreError(RuntimeError):
    """The feedback store could not be read or written (Redis down, disk full, ...)."""


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


# --- comparing a prediction with its annotation -------------------------------------------------


def compare(prediction_results: list[dict], annotation_results: list[dict],
            max_pixels: int = MAX_BRUSH_PIXELS) -> list[LabelFeedback]:
    """One ``LabelFeedback`` per label in the prediction or the annotation, by from_name then label.

    A brush region over ``max_pixels`` (FREESEG_MAX_IMAGE_PIXELS) raises ``BrushSizeError``.
    """
    predicted, annotated = _label_masks(prediction_results, max_pixels), _label_masks(annotation_results, max_pixels)
    return [_label_feedback(key, predicted.get(key), annotated.get(key))
            for key in sorted(predicted.keys() | annotated.keys())]


def iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks are identical (1.0)."""
    union = np.logical_or(first, second).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(first, second).sum() / union)


def _label_feedback(key: _Key, predicted: np.ndarray | None, annotated: np.ndarray | None) -> LabelFeedback:
    label = key[1]
    if annotated is None:
        return LabelFeedback(label, 0.0, DELETED)
    if predicted is None:
        return LabelFeedback(label, 0.0, ADDED)
    if predicted.shape != annotated.shape:
        log.warning("label %r of %r: predicted mask is %s, annotated %s; scored as IoU 0",
                    label, key[0], predicted.shape, annotated.shape)
        return LabelFeedback(label, 0.0, EDITED)
    score = iou(predicted, annotated)
    return LabelFeedback(label, score, KEPT if score >= KEPT_IOU else EDITED)


def _label_masks(results: list[dict], max_pixels: int) -> dict[_Key, np.ndarray]:
    """The OR of all brush regions per (from_name, label); undecodable regions are left out."""
    masks: dict[_Key, np.ndarray] = {}
    for result in results:
        if result.get("type") != "brushlabels":
            continue
        value = result.get("value")
        labels = (value.get("brushlabels") if isinstance(value, dict) else None) or []
        mask = decode_brush(result, max_pixels) if labels else None
        if mask is None:  # no label to credit, or an RLE that does not decode
            continue
        for label in labels:
            _merge(masks, (result.get("from_name", ""), label), mask)
    return masks


def _merge(masks: dict[_Key, np.ndarray], key: _Key, mask: np.ndarray) -> None:
    if key not in masks:
        masks[key] = mask.copy()
    elif masks[key].shape != mask.shape:
        log.warning("skipping a %s region of label %r of %r: its other regions are %s",
                    mask.shape, key[1], key[0], masks[key].shape)
    else:
        masks[key] |= mask


# --- summaries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSummary:
    """One label over many tasks; ``mean_iou`` counts deleted and added labels as IoU 0."""

    label: str
    count: int
    mean_iou: float
    kept: int
    edited: int
    deleted: int
    added: int


def summarize(records: Iterable[FeedbackRecord]) -> dict[str, LabelSummary]:
    """Per label, sorted by label: how often it was seen, its mean IoU and its outcomes."""
    by_label: dict[str, list[LabelFeedback]] = defaultdict(list)
    for record in records:
        for feedback in record.labels:
            by_label[feedback.label].append(feedback)
    return {label: _summary(label, by_label[label]) for label in sorted(by_label)}


def _summary(label: str, feedback: list[LabelFeedback]) -> LabelSummary:
    outcomes = [f.outcome for f in feedback]
    return LabelSummary(
        label=label,
        count=len(feedback),
        mean_iou=sum(f.iou for f in feedback) / len(feedback),
        kept=outcomes.count(KEPT),
        edited=outcomes.count(EDITED),
        deleted=outcomes.count(DELETED),
        added=outcomes.count(ADDED),
    )


# --- stores -------------------------------------------------------------------------------------


class FeedbackStore(Protocol):
    """Where feedback records are kept, per project, in the order they were added."""

    def add(self, record: FeedbackRecord) -> None: ...

    def records(self, project: str) -> list[FeedbackRecord]: ...


def checked_project(project: str) -> str:
    """``project`` if it is a safe name (letters, digits, ``.``, ``_``, ``-``), else ``ValueError``.

    Both stores apply it, so a project that works with one works with the other.
    """
    if not isinstance(project, str) or not _PROJECT_NAME.fullmatch(project):
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

    def __init__(self, url: str, timeout_seconds: float = 2.0) -> None:
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


def create_feedback_store(redis_url: str | None, folder: Path) -> FeedbackStore:
    """Redis when a URL is given (shared by all workers and replicas), else files in ``folder``."""
    if redis_url:
        return RedisFeedbackStore(redis_url)
    return FileFeedbackStore(folder)
