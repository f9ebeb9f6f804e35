"""Projects' memories in the shared store: read again only when their revision changed."""

from __future__ import annotations

import numpy as np

from backend.memories import ProjectMemories, SharedMemoryStore
from backend.pipeline.memory import LabelExamples, MemoryBounds
from backend.store import FileStore

BOUNDS = MemoryBounds(label_bytes=1 << 20, project_bytes=1 << 22)


class CountingStore(FileStore):
    """A file store that counts reads per key."""

    def __init__(self, folder) -> None:
        super().__init__(folder)
        self.reads: dict[str, int] = {}

    def get(self, key: str) -> bytes | None:
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().get(key)


def _examples(value: float) -> dict[str, LabelExamples]:
    return {"rust": LabelExamples(np.full((1, 4), value, np.float16), np.full((3, 4), value, np.float16))}


def test_predictions_reread_the_memory_only_when_its_revision_changed(tmp_path):
    store = CountingStore(tmp_path)  # the reader's: another process's view of the same folder
    writer = ProjectMemories(SharedMemoryStore(FileStore(tmp_path)), BOUNDS)
    reader = ProjectMemories(SharedMemoryStore(store), BOUNDS)
    assert reader.for_predictions("1", "fp", "v") == ("v", None)
    writer.change("1", "fp", 4, lambda memory: memory.learn("7", _examples(1.0)))
    for _ in range(3):
        version, exemplars = reader.for_predictions("1", "fp", "v")
    assert version == "v-m1" and exemplars.regions == {"rust": 1}
    assert store.reads["memory:1.fp"] == 1 and store.reads["memory-revision:1.fp"] == 4
    writer.change("1", "fp", 4, lambda memory: memory.learn("8", _examples(2.0)))
    version, exemplars = reader.for_predictions("1", "fp", "v")
    assert version == "v-m2" and exemplars.regions == {"rust": 2} and store.reads["memory:1.fp"] == 2


def test_clear_empties_the_memory_and_its_revision_still_grows(tmp_path):
    memories = ProjectMemories(SharedMemoryStore(FileStore(tmp_path)), BOUNDS)
    assert memories.clear("1", "fp") is None
    memories.change("1", "fp", 4, lambda memory: memory.learn("7", _examples(1.0)))
    cleared = memories.clear("1", "fp")
    assert cleared.annotations == {} and cleared.revision == 2
    assert memories.for_predictions("1", "fp", "v")[0] == "v-m2"
    assert memories.forget("1", "fp", "7") is False
    # an emptied memory takes the channels of the next encoding
    assert memories.change("1", "fp", 8, lambda memory: None).channels == 8
