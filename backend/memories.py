"""Projects' memories in the shared store: one value per project and models' fingerprint.

A memory lives under ``memory:<project>.<fingerprint>`` as ``Memory.to_bytes()`` (Redis when
REDIS_URL is set, else an owner-only file under MODEL_DIR), so every process and a restart
see the same one. Beside it, ``memory-revision:<project>.<fingerprint>`` holds its revision
as text: a prediction reads that small key and re-reads the memory (up to 64 MB) only when
the revision changed. Changes are read-modify-writes under the store's lock for that key,
so two processes learning at once do not lose each other's annotations.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from backend.pipeline.exemplars import Exemplars
from backend.pipeline.memory import Memory, MemoryBounds, memory_revision
from backend.settings import Settings
from backend.store import SharedStore, create_store


def memory_version(version: str, revision: int) -> str:
    """The model_version of predictions made with a memory of ``revision``: ``version`` with a suffix, ``...-m12``."""
    return f"{version}-m{revision}"


class SharedMemoryStore:
    """A ``MemoryStore`` (``backend.pipeline.memory``) on a ``SharedStore``, with revision keys and a lock."""

    def __init__(self, store: SharedStore) -> None:
        self.store = store

    @staticmethod
    def _name(project: str, fingerprint: str) -> str:
        return f"{project}.{fingerprint}"

    def load(self, project: str, fingerprint: str) -> bytes | None:
        return self.store.get(f"memory:{self._name(project, fingerprint)}")

    def save(self, project: str, fingerprint: str, data: bytes) -> None:
        """The memory first, then its revision: a reader that sees the new revision finds the new memory."""
        name = self._name(project, fingerprint)
        self.store.put(f"memory:{name}", data)
        self.store.put(f"memory-revision:{name}", str(memory_revision(data)).encode())

    def delete(self, project: str, fingerprint: str) -> None:
        name = self._name(project, fingerprint)
        self.store.delete(f"memory-revision:{name}")
        self.store.delete(f"memory:{name}")

    def revision(self, project: str, fingerprint: str) -> int | None:
        """The saved memory's revision; None when the project has no memory for these models."""
        data = self.store.get(f"memory-revision:{self._name(project, fingerprint)}")
        return int(data) if data else None

    def lock(self, project: str, fingerprint: str) -> AbstractContextManager[None]:
        return self.store.lock(f"memory:{self._name(project, fingerprint)}")


class ProjectMemories:
    """Reading, changing and caching projects' memories of one store, within ``bounds``."""

    def __init__(self, store: SharedMemoryStore, bounds: MemoryBounds) -> None:
        self.store, self.bounds = store, bounds
        self._cached: dict[tuple[str, str], tuple[int, Exemplars]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ProjectMemories:
        """The memories of the settings' shared store (REDIS_URL, else files under MODEL_DIR)."""
        return cls(SharedMemoryStore(create_store(settings.redis_url, settings.model_dir)), settings.memory_bounds)

    def load(self, project: str, fingerprint: str) -> Memory | None:
        return self.parse(self.store.load(project, fingerprint))

    def parse(self, data: bytes | None) -> Memory | None:
        """A memory from the bytes it was saved as, fitted to ``bounds``; None for no bytes."""
        return Memory.from_bytes(data, self.bounds) if data else None

    def exemplars(self, project: str, fingerprint: str) -> tuple[int, Exemplars] | None:
        """The memory's revision and exemplars for predictions; re-read only when the revision changed."""
        revision = self.store.revision(project, fingerprint)
        if revision is None:
            return None
        with self._lock:
            cached = self._cached.get((project, fingerprint))
        if cached is not None and cached[0] == revision:
            return cached
        memory = self.load(project, fingerprint)
        if memory is None:
            return None
        current = (memory.revision, Exemplars.from_memory(memory))
        with self._lock:
            self._cached[(project, fingerprint)] = current
        return current

    def for_predictions(self, project: str, fingerprint: str, version: str) -> tuple[str, Exemplars | None]:
        """``memory_version`` of ``version`` and the memory's exemplars; ``version`` and None without a memory."""
        current = self.exemplars(project, fingerprint)
        return (memory_version(version, current[0]), current[1]) if current else (version, None)

    def change(self, project: str, fingerprint: str, channels: int, edit: Callable[[Memory], object]) -> Memory:
        """Apply ``edit`` to the project's memory and save it, locked; a memory holding nothing takes ``channels``."""
        with self.store.lock(project, fingerprint):
            memory = self.load(project, fingerprint)
            if memory is None or (not memory.annotations and memory.channels != channels):
                memory = Memory(fingerprint, channels, self.bounds, revision=memory.revision if memory else 0)
            edit(memory)
            self.store.save(project, fingerprint, memory.to_bytes())
        return memory

    def forget(self, project: str, fingerprint: str, annotation_id: str) -> bool:
        """Remove what one annotation taught; False when the project's memory holds nothing of it."""
        with self.store.lock(project, fingerprint):
            memory = self.load(project, fingerprint)
            if memory is None or not memory.forget(annotation_id):
                return False
            self.store.save(project, fingerprint, memory.to_bytes())
        return True

    def clear(self, project: str, fingerprint: str) -> Memory | None:
        """Empty the project's memory (its revision still grows, so model_version changes); None when none."""
        with self.store.lock(project, fingerprint):
            memory = self.load(project, fingerprint)
            if memory is not None:
                memory.clear()
                self.store.save(project, fingerprint, memory.to_bytes())
        return memory
