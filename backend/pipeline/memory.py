"""A project's memory of what its annotators said: feature exemplars per label, per annotation.

Each annotation teaches, per label, one prototype per annotated region (its mean feature) and
a sample of the feature cells the label covers (see ``teaching``). What an annotation taught
is kept under its id, so updating the annotation replaces it and deleting it removes it. The
memory is bounded in bytes per label and per project: beyond a bound, the annotation holding
the most cells of the label gives up every other cell (halving its sample), so old and new
annotations keep a fair share. The memory is for one models' fingerprint: features of other
models are never mixed in. Its ``revision`` grows with every change.

It travels as safetensors bytes (two float16 arrays and a JSON header): no pickle, so bytes
from Redis or a file cannot run code. ``MemoryStore`` is where memories are kept.
"""

from __future__ import annotations

import json
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


@dataclass
class Memory:
    """One project's exemplars for one models' fingerprint, kept per annotation id."""

    fingerprint: str
    channels: int
    bounds: MemoryBounds
    revision: int = 0
    annotations: dict[str, Taught] = field(default_factory=dict)  # in the order they were taught

    def learn(self, annotation_id: str, taught: Taught) -> None:
        """Replace what ``annotation_id`` taught by ``taught`` (nothing taught: the annotation is forgotten)."""
        for label, examples in taught.items():
            for array in (examples.prototypes, examples.cells):
                if array.ndim != 2 or array.shape[1] != self.channels:
                    raise ValueError(f"label {label!r}: examples of shape {array.shape}, expected (n, {self.channels})")
        self.annotations.pop(annotation_id, None)
        kept = {label: _as_float16(examples) for label, examples in taught.items()
                if len(examples.prototypes) or len(examples.cells)}
        if kept:
            self.annotations[annotation_id] = kept
        self._fit_bounds()
        self.revision += 1

    def forget(self, annotation_id: str) -> bool:
        """Remove what ``annotation_id`` taught; False when it taught nothing."""
        if self.annotations.pop(annotation_id, None) is None:
            return False
        self.revision += 1
        return True

    def clear(self) -> None:
        self.annotations.clear()
        self.revision += 1

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
            taught[label] = LabelExamples(examples.prototypes, examples.cells[::2] if len(examples.cells) > 1
                                          else examples.cells[:0])
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
                  "entries": entries}
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


class InMemoryStore:
    """A ``MemoryStore`` in a dict of this process: for tests and the replay harness."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], bytes] = {}

    def load(self, project: str, fingerprint: str) -> bytes | None:
        return self._data.get((project, fingerprint))

    def save(self, project: str, fingerprint: str, data: bytes) -> None:
        self._data[(project, fingerprint)] = bytes(data)

    def delete(self, project: str, fingerprint: str) -> None:
        self._data.pop((project, fingerprint), None)
