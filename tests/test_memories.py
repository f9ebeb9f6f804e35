"""Projects' memories in the shared store: read again only when their revision changed, kept across restarts."""

from __future__ import annotations

import numpy as np
import pytest

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.projects import ProjectSetup, ProjectStore
from backend.storage.memory_store import (MEMORY_NAMESPACES, ProjectMemories, SharedMemoryStore, clock_revision,
                                          memory_version)
from backend.pipeline.memory import LabelExamples, MemoryBounds
from backend.storage.shared_store import FileStore, RedisStore
from tests.redis_server import RedisServer

BOUNDS = MemoryBounds(label_bytes=1 << 20, project_bytes=1 << 22)
CACHE = 1 << 24


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


def _teach(memories: ProjectMemories, annotation: str, value: float, project: str = "1", fingerprint: str = "fp"):
    return memories.change(project, fingerprint, 4, lambda memory: memory.learn(annotation, _examples(value)))


def test_predictions_reread_the_memory_only_when_its_revision_changed(tmp_path):
    store = CountingStore(tmp_path)  # the reader's: another process's view of the same folder
    writer = ProjectMemories(SharedMemoryStore(FileStore(tmp_path)), BOUNDS, CACHE)
    reader = ProjectMemories(SharedMemoryStore(store), BOUNDS, CACHE)
    assert reader.exemplars("1", "fp") is None
    first = _teach(writer, "7", 1.0).revision
    for _ in range(3):
        revision, exemplars = reader.exemplars("1", "fp")
    assert revision == first and exemplars.regions == {"rust": 1}
    assert store.reads["memory:1.fp"] == 1 and store.reads["memory-revision:1.fp"] == 4
    second = _teach(writer, "8", 2.0).revision
    revision, exemplars = reader.exemplars("1", "fp")
    assert second > first and revision == second
    assert exemplars.regions == {"rust": 2} and store.reads["memory:1.fp"] == 2


def test_an_update_that_changes_nothing_is_not_saved_and_keeps_the_version(tmp_path):
    store = CountingStore(tmp_path)
    memories = ProjectMemories(SharedMemoryStore(store), BOUNDS, CACHE)
    revision = _teach(memories, "7", 1.0).revision
    data = store.get("memory:1.fp")
    assert _teach(memories, "7", 1.0).revision == revision
    assert store.get("memory:1.fp") == data and memories.exemplars("1", "fp")[0] == revision


def test_clear_empties_the_memory_and_its_revision_still_grows(tmp_path):
    memories = ProjectMemories(SharedMemoryStore(FileStore(tmp_path)), BOUNDS, CACHE)
    assert memories.clear("1", "fp") is None
    taught = _teach(memories, "7", 1.0).revision
    cleared = memories.clear("1", "fp")
    assert cleared.annotations == {} and cleared.revision > taught
    assert memories.exemplars("1", "fp")[0] == cleared.revision
    assert memories.forget("1", "fp", "7") is False
    # an emptied memory takes the channels of the next encoding
    assert memories.change("1", "fp", 8, lambda memory: False).channels == 8


def test_a_deletion_before_any_learn_is_kept_without_changing_the_version(tmp_path):
    memories = ProjectMemories(SharedMemoryStore(FileStore(tmp_path)), BOUNDS, CACHE)
    assert memories.forget("1", "fp", "7", deleted=True)  # the delete's webhook came first
    assert memory_version("v", memories.exemplars("1", "fp")[0]) == "v"  # nothing taught: the version as before
    assert _teach(memories, "7", 1.0).annotations == {}  # the learn that read it before it was deleted


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_drop_deletes_the_projects_memories_of_every_fingerprint_only(kind, tmp_path, redis_server):
    store = FileStore(tmp_path) if kind == "file" else RedisStore(redis_server.url)
    memories = ProjectMemories(SharedMemoryStore(store), BOUNDS, CACHE)
    for project, fingerprint in (("3", "fp"), ("3", "other"), ("31", "fp")):
        _teach(memories, "7", 1.0, project, fingerprint)
    assert memories.drop("3") == ["fp", "other"]
    assert memories.load("3", "fp") is None and memories.load("3", "other") is None
    assert memories.store.revision("3", "fp") is None and memories.load("31", "fp") is not None
    assert memories.drop("3") == []


def test_memories_and_setups_survive_redis_killed_and_restarted_with_its_aof(start_redis):
    server: RedisServer = start_redis(append_only=True)
    memories = ProjectMemories(SharedMemoryStore(RedisStore(server.url)), BOUNDS, CACHE)
    setup = ProjectSetup("<View/>", {"k": 3}, LabelStudioAccess("http://ls:8080", "token"))
    ProjectStore(RedisStore(server.url)).save("1", setup)
    taught = _teach(memories, "7", 1.0)
    server.kill()  # no shutdown: only what the AOF already holds survives
    server.start()
    again = ProjectMemories(SharedMemoryStore(RedisStore(server.url)), BOUNDS, CACHE)  # a restarted backend's
    kept = again.load("1", "fp")
    assert kept.revision == taught.revision and list(kept.annotations) == ["7"]
    np.testing.assert_array_equal(kept.vectors("rust"), taught.vectors("rust"))
    assert again.exemplars("1", "fp")[0] == taught.revision
    assert ProjectStore(RedisStore(server.url)).load("1") == setup


def test_a_memory_lost_with_redis_never_takes_a_revision_again(start_redis):
    server: RedisServer = start_redis()  # no persistence: a restart loses everything
    memories = ProjectMemories(SharedMemoryStore(RedisStore(server.url)), BOUNDS, CACHE)
    before = [_teach(memories, str(annotation), float(annotation)).revision for annotation in range(5)]
    server.stop()
    server.start()
    assert memories.load("1", "fp") is None
    after = _teach(memories, "100", 9.0).revision  # other contents than any revision before named
    assert before == sorted(set(before)) and after > before[-1] and after >= clock_revision() - 60_000


def test_an_unused_memory_expires_in_files_and_a_used_one_does_not(tmp_path):
    import os
    import time

    expiring = dict.fromkeys(MEMORY_NAMESPACES, 3600)
    memories = ProjectMemories(SharedMemoryStore(FileStore(tmp_path, expiring)), BOUNDS, CACHE)
    for project in ("1", "2"):
        _teach(memories, "7", 1.0, project)
    two_hours_ago = time.time() - 7200
    for path in (tmp_path / "memory").iterdir():
        os.utime(path, (two_hours_ago, two_hours_ago))
    for path in (tmp_path / "memory-revision").iterdir():
        os.utime(path, (two_hours_ago, two_hours_ago))
    assert memories.exemplars("1", "fp") is None  # unused for two hours: gone
    assert memories.load("1", "fp") is None and not (tmp_path / "memory-revision" / "1.fp").exists()
    os.utime(tmp_path / "memory-revision" / "2.fp")  # ...unless the other key was just used
    assert memories.exemplars("2", "fp") is not None  # reading it marks the memory used
    assert time.time() - (tmp_path / "memory" / "2.fp").stat().st_mtime < 60


def test_an_unused_memory_expires_in_redis_and_each_prediction_restarts_its_time(redis_server):
    import time

    store = RedisStore(redis_server.url, expiring=dict.fromkeys(MEMORY_NAMESPACES, 100))
    memories = ProjectMemories(SharedMemoryStore(store), BOUNDS, CACHE)
    _teach(memories, "7", 1.0, "5")
    with redis_server.client() as client:
        keys = ["freeseg:memory:5.fp", "freeseg:memory-revision:5.fp"]
        assert all(90 < client.ttl(key) <= 100 for key in keys)
        for key in keys:
            client.expire(key, 5)
        assert memories.exemplars("5", "fp") is not None
        assert all(90 < client.ttl(key) <= 100 for key in keys)
        assert client.ttl("freeseg:projects:5") == -2  # other namespaces are not touched
    quick = RedisStore(redis_server.url, expiring={"memory-revision": 1})
    short = ProjectMemories(SharedMemoryStore(quick), BOUNDS, CACHE)
    _teach(short, "7", 1.0, "6")
    time.sleep(1.5)
    assert short.exemplars("6", "fp") is None
