"""A project's memory as people see it: what it was taught, from which annotations, at what cost.

``freesegdiff learn --project ID --show`` prints it and ``GET /memory/{project}`` serves it as JSON,
so an annotator can tell which labels the backend has learned (and will predict with its exemplars)
and which it still knows only from CLIP, and an operator what the memory weighs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from backend.storage.memory_store import memory_version
from backend.pipeline.memory import UNLABELED, Memory, Source

UNLABELED_NAME = "(unlabeled)"  # how the cells no region touched are shown


@dataclass(frozen=True)
class LabelTaught:
    """One label of a memory: its regions (prototypes), cells and bytes, and the annotations that taught it."""

    label: str  # ``UNLABELED`` ("") for the cells no region touched
    regions: int
    cells: int
    bytes: int
    annotations: list[str]


@dataclass(frozen=True)
class AnnotationTaught:
    """One annotation the memory holds examples of: its task, when Label Studio last changed it, its labels."""

    annotation: str
    task: str | None
    updated_at: str | None
    labels: list[str]


@dataclass(frozen=True)
class MemorySummary:
    project: str
    fingerprint: str
    model_version: str  # of the predictions made with this memory
    revision: int
    channels: int
    bytes: int
    labels: list[LabelTaught]
    annotations: list[AnnotationTaught]
    deleted_annotations: int  # refused for good: Label Studio deleted them
    deleted_tasks: int

    @classmethod
    def of(cls, project: str, memory: Memory, version: str) -> MemorySummary:
        """The summary of ``memory``; ``version`` is the model_version without a memory."""
        labels = [LabelTaught(label, memory.regions_taught(label), _cells(memory.annotations, label),
                              memory.label_bytes(label),
                              [a for a, taught in memory.annotations.items() if label in taught])
                  for label in memory.labels]
        sources = {a: memory.sources.get(a, Source()) for a in memory.annotations}
        annotations = [AnnotationTaught(a, sources[a].task, sources[a].updated_at, list(taught))
                       for a, taught in memory.annotations.items()]
        return cls(project, memory.fingerprint, memory_version(version, memory.revision), memory.revision,
                   memory.channels, memory.nbytes, labels, annotations, len(memory.deleted_annotations),
                   len(memory.deleted_tasks))

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """Fixed-width text for a terminal: a header line, a row per label, a row per annotation."""
        lines = [f"project {self.project}: memory revision {self.revision}, {self.bytes} bytes, "
                 f"{len(self.annotations)} annotations, model_version {self.model_version}",
                 f"{'label':<20} {'regions':>7} {'cells':>7} {'bytes':>10}  annotations"]
        lines += [f"{_shown(item.label):<20} {item.regions:>7} {item.cells:>7} {item.bytes:>10}  "
                  f"{', '.join(item.annotations)}" for item in self.labels]
        lines += ["", f"{'annotation':<12} {'task':<8} {'updated at':<32} labels"]
        lines += [f"{item.annotation:<12} {item.task or '-':<8} {item.updated_at or '-':<32} "
                  f"{', '.join(_shown(label) for label in item.labels)}" for item in self.annotations]
        if self.deleted_annotations or self.deleted_tasks:
            lines.append(f"refused for good (deleted in Label Studio): {self.deleted_annotations} annotations, "
                         f"{self.deleted_tasks} tasks")
        return "\n".join(lines)


def _cells(annotations: Mapping[str, Mapping], label: str) -> int:
    return sum(len(taught[label].cells) for taught in annotations.values() if label in taught)


def _shown(label: str) -> str:
    return UNLABELED_NAME if label == UNLABELED else label
