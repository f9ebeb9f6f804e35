"""Projects' memories in the shared store: one value per project and models' fingerprint.

A memory lives under ``memory:<project>.<fingerprint>`` as ``Memory.to_bytes()`` (Redis when
REDIS_URL is set, else an owner-only file under MODEL_DIR), so every process and a restart
see the same one. Beside it, ``memory-revision:<project>.<fingerprint>`` holds its revision
as text: a prediction reads that small key and re-reads the memory (up to
FREESEG_MEMORY_PROJECT_BYTES) only when the revision changed. Changes are read-modify-writes
under the store's lock for that key, so two processes learning at once do not lose each
other's annotations; only a change is saved, and one of the examples takes a revision from
the clock (``clock_revision``), so that revisions never repeat even after the store lost the
memory. Memories unused for FREESEG_MEMORY_TTL_SECONDS expire, and each process caches the
exemplars of the projects it predicted last within FREESEG_MEMORY_CACHE_BYTES.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager

from backend.pipeline.exemplars import Exemplars
from backend.pipeline.memory import Memory, MemoryBounds, memory_revision
from backend.settings import Settings
from backend.storage.shared_store import SharedStore


def memory_version(version: str, revision: int) -> str:
    """The model_version of predictions made with a memory of ``revision``: ``version`` with a suffix.

    Revision 0, a memory that never held an example (only deletions), leaves ``version`` as it is.
    """
    return f"{version}-m{revision}" if revision else version


def clock_revision() -> int:
    """The wall clock in milliseconds: the least revision a change saved now may take.

    A changed memory's revision is one more than before and at least this, so a memory lost with its
    store (a Redis without persistence restarted) and taught again never takes a revision it had:
    ``-m<revision>`` never names two contents (unless the clocks of the writers go back).
    """
    return time.time_ns() // 1_000_000


MEMORY_NAMESPACES = ("memory", "memory-revision")  # what FREESEG_MEMORY_TTL_SECONDS expires


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
        """The saved memory's revision, which marks the memory used; None when the project has none."""
        name = self._name(project, fingerprint)
        data = self.store.get(f"memory-revision:{name}")
        if not data:
            return None
        self.store.touch(f"memory-revision:{name}")
        self.store.touch(f"memory:{name}")
        return int(data)

    def lock(self, project: str, fingerprint: str) -> AbstractContextManager[None]:
        return self.store.lock(f"memory:{self._name(project, fingerprint)}")

    def fingerprints(self, project: str) -> list[str]:
        """The models' fingerprints the project has a memory of."""
        return [name.removeprefix(f"{project}.") for name in self.store.names("memory", f"{project}.")]


def memory_bounds(settings: Settings) -> MemoryBounds:
    """FREESEG_MEMORY_LABEL_BYTES and FREESEG_MEMORY_PROJECT_BYTES, as a project's memory takes them."""
    return MemoryBounds(label_bytes=settings.memory_label_bytes, project_bytes=settings.memory_project_bytes)


class ProjectMemories:
    """Reading, changing and caching projects' memories of one store, within ``bounds``.

    The exemplars of the projects predicted last are cached, at most ``cache_bytes`` of them in all
    (the least recently used go first; one larger than that is used, not kept).
    """

    def __init__(self, store: SharedMemoryStore, bounds: MemoryBounds, cache_bytes: int) -> None:
        self.store, self.bounds, self.cache_bytes = store, bounds, cache_bytes
        self._cached: OrderedDict[tuple[str, str], tuple[int, Exemplars]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def cached_bytes(self) -> int:
        """Bytes of the exemplars this process holds now."""
        with self._lock:
            return sum(exemplars.nbytes for _, exemplars in self._cached.values())

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
        key = (project, fingerprint)
        with self._lock:
            cached = self._cached.get(key)
            if cached is not None and cached[0] == revision:
                self._cached.move_to_end(key)
                return cached
        memory = self.load(project, fingerprint)
        if memory is None:
            return None
        current = (memory.revision, Exemplars.from_memory(memory))
        self._keep(key, current)
        return current

    def _keep(self, key: tuple[str, str], current: tuple[int, Exemplars]) -> None:
        """Cache ``current`` as the most recently used, dropping the least recently used beyond the bound."""
        with self._lock:
            self._cached.pop(key, None)
            if current[1].nbytes > self.cache_bytes:
                return
            self._cached[key] = current
            held = sum(exemplars.nbytes for _, exemplars in self._cached.values())
            while held > self.cache_bytes:
                _, (_, dropped) = self._cached.popitem(last=False)
                held -= dropped.nbytes

    def change(self, project: str, fingerprint: str, channels: int, edit: Callable[[Memory], bool]) -> Memory:
        """Apply ``edit`` to the project's memory (a new one when none), saved when ``edit`` says it changed.

        A memory holding nothing takes ``channels``.
        """
        return self._edit(project, fingerprint, channels, edit)[0]

    def forget(self, project: str, fingerprint: str, annotation_id: str, deleted: bool = False) -> bool:
        """Remove what one annotation taught (``deleted`` in Label Studio: refuse it from now on, even unseen)."""
        return self._edit(project, fingerprint, 0 if deleted else None,
                          lambda memory: memory.forget(annotation_id, deleted))[1]

    def forget_tasks(self, project: str, fingerprint: str, task_ids: list[str]) -> bool:
        """Remove what the annotations of the deleted ``task_ids`` taught, and refuse them from now on."""
        return self._edit(project, fingerprint, 0, lambda memory: memory.forget_tasks(task_ids))[1]

    def clear(self, project: str, fingerprint: str) -> Memory | None:
        """Empty the project's memory (its revision still grows, so model_version changes); None when none."""
        return self._edit(project, fingerprint, None, Memory.clear)[0]

    def drop(self, project: str) -> list[str]:
        """Delete the project's memories of every models' fingerprint; the fingerprints dropped."""
        fingerprints = self.store.fingerprints(project)
        for fingerprint in fingerprints:
            with self.store.lock(project, fingerprint):
                self.store.delete(project, fingerprint)
        return fingerprints

    def _edit(self, project: str, fingerprint: str, channels: int | None,
              edit: Callable[[Memory], bool]) -> tuple[Memory | None, bool]:
        """The memory after ``edit``, locked, and whether it changed (then saved, with a ``clock_revision``).

        No memory: a new one of ``channels``, or with ``channels`` None nothing is done.
        """
        with self.store.lock(project, fingerprint):
            memory = self.load(project, fingerprint)
            if memory is None:
                if channels is None:
                    return None, False
                memory = Memory(fingerprint, channels, self.bounds)
            if channels and not memory.annotations:
                memory.channels = channels
            revision = memory.revision
            changed = edit(memory)
            if changed:
                if memory.revision != revision:
                    memory.revision = max(memory.revision, clock_revision())
                self.store.save(project, fingerprint, memory.to_bytes())
        return memory, changed
