"""A project's memory of what its annotators said: feature exemplars per label, per annotation.

Each annotation teaches, per label, one prototype per annotated region (its mean feature) and
a sample of the feature cells the label covers (see ``teaching``). What an annotation taught
is kept under its id, so updating the annotation replaces it and deleting it removes it. The
memory is bounded in bytes per label and per project: beyond a bound, the annotation holding
the most cells of the label gives up every other cell (halving its sample), so old and new
annotations keep a fair share. The memory is for one models' fingerprint: features of other
models are never mixed in. Its ``revision`` grows with every change of its examples, and only then.

It travels as safetensors bytes (two float16 arrays and a JSON header): no pickle, so bytes
from Redis or a file cannot run code. ``MemoryStore`` is where memories are kept.
"""

from __future__ import annotations

import json
from datetime import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from backend.pipeline.encoding import read_safetensors_metadata

FORMAT_VERSION = "1"
# The label under which an annotation teaches the cells none of its regions touches.
UNLABELED = ""


class MemoryFormatError(ValueError):
    """Bytes that are not a memory of this format version, or one inconsistent with itself."""


@dataclass(frozen=True)
class LabelExamples:
    """What one annotation taught about one label: region prototypes and a sample of cells."""

    prototypes: np.ndarray  # (R, C) float16: the mean feature of each annotated region
    cells: np.ndarray  # (N, C) float16: features of cells mostly covered by the label

    @property
    def nbytes(self) -> int:
        return self.prototypes.nbytes + self.cells.nbytes


Taught = dict[str, LabelExamples]  # label name -> examples, for one annotation


@dataclass(frozen=True)
class MemoryBounds:
    """Most bytes of feature vectors kept per label and per project."""

    label_bytes: int
    project_bytes: int


@dataclass(frozen=True)
class Source:
    """Where an annotation's examples came from: its task, and when Label Studio last changed it (ISO 8601)."""

    task: str | None = None
    updated_at: str | None = None

    def is_older_than(self, other: Source | None) -> bool:
        """True when ``other`` was changed later than this (unknown times are never later)."""
        if other is None or not (self.updated_at and other.updated_at):
            return False
        return datetime.fromisoformat(self.updated_at) < datetime.fromisoformat(other.updated_at)


@dataclass
class Memory:
    """One project's exemplars for one models' fingerprint, kept per annotation id.

    ``deleted_annotations`` and ``deleted_tasks`` name what Label Studio deleted: a learn that read
    one of them before it was deleted, and writes after, is refused (ids are never reused).
    """

    fingerprint: str
    channels: int
    bounds: MemoryBounds
    revision: int = 0
    annotations: dict[str, Taught] = field(default_factory=dict)  # in the order they were taught
    sources: dict[str, Source] = field(default_factory=dict)  # annotation id -> where it came from
    deleted_annotations: set[str] = field(default_factory=set)
    deleted_tasks: set[str] = field(default_factory=set)

    def learn(self, annotation_id: str, taught: Taught, source: Source = Source()) -> bool:
        """Replace what ``annotation_id`` taught by ``taught`` (nothing taught: the annotation is forgotten).

        Refused when the annotation or its task was deleted, or the memory holds a later version of it.
        The revision grows only when the examples changed. True when anything the memory keeps changed.
        """
        for label, examples in taught.items():
            for array in (examples.prototypes, examples.cells):
                if array.ndim != 2 or array.shape[1] != self.channels:
                    raise ValueError(f"label {label!r}: examples of shape {array.shape}, expected (n, {self.channels})")
        if (annotation_id in self.deleted_annotations or source.task in self.deleted_tasks
                or source.is_older_than(self.sources.get(annotation_id))):
            return False
        kept = {label: _as_float16(examples) for label, examples in taught.items()
                if len(examples.prototypes) or len(examples.cells)}
        if _same_taught(self.annotations.get(annotation_id, {}), kept):
            changed = self.sources.get(annotation_id) != source
            self.sources[annotation_id] = source
            return changed
        self.annotations.pop(annotation_id, None)
        self.sources[annotation_id] = source
        if kept:
            self.annotations[annotation_id] = kept
        self._fit_bounds()
        self.revision += 1
        return True

    def forget(self, annotation_id: str, deleted: bool = False) -> bool:
        """Remove what ``annotation_id`` taught (``deleted``: and refuse it from now on); True when anything changed."""
        known = annotation_id in self.deleted_annotations
        if deleted:
            self.deleted_annotations.add(annotation_id)
        self.sources.pop(annotation_id, None)
        if self.annotations.pop(annotation_id, None) is None:
            return deleted and not known
        self.revision += 1
        return True

    def forget_tasks(self, task_ids: Iterable[str]) -> bool:
        """Remove what the annotations of the deleted ``task_ids`` taught, and refuse them from now on."""
        tasks = set(task_ids) - self.deleted_tasks
        self.deleted_tasks |= tasks
        for annotation_id in [a for a, source in self.sources.items() if source.task in tasks]:
            self.forget(annotation_id, deleted=True)
        return bool(tasks)

    def replace(self, other: Memory) -> bool:
        """Take ``other``'s examples (a rebuild's); True when anything changed.

        Not those Label Studio deleted since, and not an older version of an annotation than this
        memory learned meanwhile (the rebuild read it before the update).
        """
        refused = {a for a, source in other.sources.items()
                   if a in self.deleted_annotations or source.task in self.deleted_tasks}
        newer = {a for a, source in other.sources.items() if source.is_older_than(self.sources.get(a))}
        sources = {a: self.sources[a] if a in newer else source for a, source in other.sources.items()
                   if a not in refused}
        annotations = {a: self.annotations[a] if a in newer else other.annotations[a] for a in sources
                       if a in (self.annotations if a in newer else other.annotations)}
        same = (list(annotations) == list(self.annotations)
                and all(_same_taught(self.annotations[a], taught) for a, taught in annotations.items()))
        changed = not same or sources != self.sources or other.channels != self.channels
        self.channels, self.annotations, self.sources = other.channels, annotations, sources
        if not same:
            self._fit_bounds()
            self.revision += 1
        return changed

    def clear(self) -> bool:
        """Forget every annotation (what Label Studio deleted stays refused); True when there was any."""
        self.sources.clear()
        if not self.annotations:
            return False
        self.annotations.clear()
        self.revision += 1
        return True

    @property
    def labels(self) -> list[str]:
        """The labels taught, in the order first taught (``UNLABELED`` among them when taught)."""
        return list(dict.fromkeys(label for taught in self.annotations.values() for label in taught))

    def label_bytes(self, label: str) -> int:
        return sum(taught[label].nbytes for taught in self.annotations.values() if label in taught)

    @property
    def nbytes(self) -> int:
        return sum(examples.nbytes for taught in self.annotations.values() for examples in taught.values())

    def regions_taught(self, label: str) -> int:
        """How many regions of ``label`` the memory holds a prototype of."""
        return sum(len(taught[label].prototypes) for taught in self.annotations.values() if label in taught)

    def vectors(self, label: str) -> np.ndarray:
        """(N, C) float16: every prototype and cell of ``label``, annotation by annotation."""
        parts = [array for taught in self.annotations.values() if label in taught
                 for array in (taught[label].prototypes, taught[label].cells)]
        return np.concatenate(parts) if parts else np.zeros((0, self.channels), np.float16)

    def _fit_bounds(self) -> None:
        for label in self.labels:
            while self.label_bytes(label) > self.bounds.label_bytes:
                self._shrink(label)
        while self.nbytes > self.bounds.project_bytes:
            self._shrink(max(self.labels, key=self.label_bytes))

    def _shrink(self, label: str) -> None:
        """Halve the largest cell sample of ``label``; with no cell left, drop its oldest annotation's examples."""
        holders = [(annotation_id, taught) for annotation_id, taught in self.annotations.items() if label in taught]
        annotation_id, taught = max(holders, key=lambda holder: len(holder[1][label].cells))
        examples = taught[label]
        if len(examples.cells):
            # copies, not views: a view would keep the whole sample it was cut from alive
            taught[label] = LabelExamples(examples.prototypes, examples.cells[::2].copy() if len(examples.cells) > 1
                                          else np.zeros((0, self.channels), np.float16))
            return
        oldest_id, oldest = holders[0]
        del oldest[label]
        if not oldest:
            del self.annotations[oldest_id]

    def to_bytes(self) -> bytes:
        entries, prototypes, cells = [], [], []
        for annotation_id, taught in self.annotations.items():
            for label, examples in taught.items():
                entries.append([annotation_id, label, len(examples.prototypes), len(examples.cells)])
                prototypes.append(examples.prototypes)
                cells.append(examples.cells)
        empty = np.zeros((0, self.channels), np.float16)
        header = {"fingerprint": self.fingerprint, "channels": self.channels, "revision": self.revision,
                  "entries": entries,
                  "sources": {a: [source.task, source.updated_at] for a, source in self.sources.items()},
                  "deleted_annotations": sorted(self.deleted_annotations), "deleted_tasks": sorted(self.deleted_tasks)}
        arrays = {"prototypes": np.concatenate(prototypes) if prototypes else empty,
                  "cells": np.concatenate(cells) if cells else empty}
        return save_tensors(arrays, metadata={"format": FORMAT_VERSION, "memory": json.dumps(header)})

    @classmethod
    def from_bytes(cls, data: bytes, bounds: MemoryBounds) -> Memory:
        """The memory ``to_bytes`` wrote, fitted to ``bounds`` (they may have been lowered since)."""
        try:
            metadata = read_safetensors_metadata(data)
            if metadata.get("format") != FORMAT_VERSION:
                raise MemoryFormatError(f"memory format {metadata.get('format')!r}, expected {FORMAT_VERSION}")
            header = json.loads(metadata["memory"])
            arrays = load_tensors(data)
            memory = cls(fingerprint=str(header["fingerprint"]), channels=int(header["channels"]), bounds=bounds,
                         revision=int(header["revision"]))
            memory.annotations = _read_entries(header["entries"], arrays["prototypes"], arrays["cells"],
                                               memory.channels)
            # absent from memories saved before sources and deletions were kept
            memory.sources = {str(a): Source(*source) for a, source in header.get("sources", {}).items()}
            memory.deleted_annotations = {str(a) for a in header.get("deleted_annotations", [])}
            memory.deleted_tasks = {str(t) for t in header.get("deleted_tasks", [])}
        except MemoryFormatError:
            raise
        except Exception as error:  # safetensors and json raise their own types for malformed bytes
            raise MemoryFormatError(f"not a memory: {error}") from error
        memory._fit_bounds()
        return memory


def memory_revision(data: bytes) -> int:
    """The revision of ``Memory.to_bytes`` bytes, from their header alone (no arrays read)."""
    try:
        return int(json.loads(read_safetensors_metadata(data)["memory"])["revision"])
    except Exception as error:  # struct, json and key errors of bytes that are not a memory
        raise MemoryFormatError(f"not a memory: {error}") from error


def _same_taught(first: Taught, second: Taught) -> bool:
    """The same labels in the same order, with equal examples."""
    return list(first) == list(second) and all(
        np.array_equal(first[label].prototypes, second[label].prototypes)
        and np.array_equal(first[label].cells, second[label].cells) for label in first)


def _as_float16(examples: LabelExamples) -> LabelExamples:
    return LabelExamples(np.ascontiguousarray(examples.prototypes, np.float16),
                         np.ascontiguousarray(examples.cells, np.float16))


def _read_entries(entries: Iterable[Sequence[object]], prototypes: np.ndarray, cells: np.ndarray,
                  channels: int) -> dict[str, Taught]:
    """The per-annotation examples of a header's entries; counts must add up to the arrays exactly."""
    for name, array in (("prototypes", prototypes), ("cells", cells)):
        if array.dtype != np.float16 or array.ndim != 2 or array.shape[1] != channels:
            raise MemoryFormatError(f"{name} is {array.dtype} {array.shape}, expected float16 (n, {channels})")
    annotations: dict[str, Taught] = {}
    prototype_start = cell_start = 0
    for annotation_id, label, prototype_count, cell_count in entries:
        if not (isinstance(annotation_id, str) and isinstance(label, str)
                and isinstance(prototype_count, int) and isinstance(cell_count, int)
                and prototype_count >= 0 and cell_count >= 0):
            raise MemoryFormatError(f"bad entry {[annotation_id, label, prototype_count, cell_count]!r}")
        annotations.setdefault(annotation_id, {})[label] = LabelExamples(
            prototypes[prototype_start : prototype_start + prototype_count],
            cells[cell_start : cell_start + cell_count])
        prototype_start += prototype_count
        cell_start += cell_count
    if (prototype_start, cell_start) != (len(prototypes), len(cells)):
        raise MemoryFormatError("the entries' counts do not add up to the arrays")
    return annotations


class MemoryStore(Protocol):
    """Where memories are kept, per project and models' fingerprint, as ``Memory.to_bytes`` bytes."""

    def load(self, project: str, fingerprint: str) -> bytes | None: ...

    def save(self, project: str, fingerprint: str, data: bytes) -> None: ...

    def delete(self, project: str, fingerprint: str) -> None: ...


class ProcessStore:
    """A ``MemoryStore`` in a dict of this process: for tests and the replay harness."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], bytes] = {}

    def load(self, project: str, fingerprint: str) -> bytes | None:
        return self._data.get((project, fingerprint))

    def save(self, project: str, fingerprint: str, data: bytes) -> None:
        self._data[(project, fingerprint)] = bytes(data)

    def delete(self, project: str, fingerprint: str) -> None:
        self._data.pop((project, fingerprint), None)
