"""The learning's cost at the full feature width (6,400 channels on the 32x32 grid), without models.

Features are synthetic; Label Studio is the loopback stand-in. What is measured is what the code
allocates (tracemalloc sees numpy's arrays), so the figures do not depend on what else runs.
"""

from __future__ import annotations

import tracemalloc

import numpy as np

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.backoff import Backoff
from backend.labelstudio.task_images import TaskImageLoader
from backend.labelstudio.teacher import ProjectTeacher
from backend.labelstudio.projects import ProjectStore
from backend.storage.memory_store import ProjectMemories, SharedMemoryStore, memory_bounds
from backend.pipeline.encoding import Encoding
from backend.pipeline.exemplars import Exemplars, exemplar_probabilities
from backend.pipeline.memory import LabelExamples, Memory, MemoryBounds
from backend.settings import Settings
from backend.storage.shared_store import FileStore
from tests.fake_labelstudio import TOKEN, FakeLabelStudio, data_uri, polygon

CHANNELS, GRID = 6400, 32  # the default U-Net features: level 2 queries, resized to 32 x 32
CONFIG = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="rust"/><Label value="lesion"/></BrushLabels></View>"""
LEFT = [(0, 0), (50, 0), (50, 100), (0, 100)]
RIGHT = [(50, 0), (100, 0), (100, 100), (50, 100)]
MiB = 1024**2
REBUILD_PEAK_BOUND = 128 * MiB  # measured 63: one encoding cast to float32 (26 MB), its examples (13), the memory


def _features(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(CHANNELS, GRID, GRID)).astype(np.float16)


def test_a_rebuild_of_200_annotations_applies_the_bounds_as_it_goes(tmp_path):
    settings = Settings(model_dir=tmp_path, allow_private_urls=True)  # the default bounds: 4 MiB a label, 64 in all
    pool = [_features(seed) for seed in range(4)]  # each annotation teaches 1,026 vectors, 13 MB of float16
    calls = []

    def encode(image) -> Encoding:
        calls.append(1)
        return Encoding(features=pool[len(calls) % len(pool)], image_embedding=np.zeros(4, np.float32), caption="",
                        width=image.pixels.shape[1], height=image.pixels.shape[0], fingerprint="fp")

    memories = ProjectMemories(SharedMemoryStore(FileStore(tmp_path)), memory_bounds(settings),
                               settings.memory_cache_bytes)
    teacher = ProjectTeacher(memories, ProjectStore(FileStore(tmp_path)), TaskImageLoader.from_settings(settings),
                             encode, "fp", Backoff.from_settings(settings))
    image = data_uri(np.full((16, 16, 3), 128, np.uint8))
    with FakeLabelStudio() as fake:
        fake.projects = {1: CONFIG}
        fake.tasks = {task: {"project": 1, "data": {"image": image}} for task in range(1, 201)}
        fake.annotations = {1000 + task: {"task": task, "result": [polygon("rust", LEFT), polygon("lesion", RIGHT)]}
                            for task in fake.tasks}
        tracemalloc.start()
        try:
            memory = teacher.rebuild("1", LabelStudioAccess(fake.url, TOKEN))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    print(f"rebuild of 200 annotations at {CHANNELS} channels: peak {peak / MiB:.1f} MiB traced, "
          f"memory {memory.nbytes / MiB:.1f} MiB")
    assert len(calls) == 200 and len(memory.annotations) == 200  # every annotation keeps its prototypes
    assert all(memory.label_bytes(label) <= settings.memory_label_bytes for label in memory.labels)
    assert memory.nbytes <= settings.memory_project_bytes
    assert peak < REBUILD_PEAK_BOUND  # gathering first would hold 200 x 13 MB = 2.6 GB


def _exemplars(rows: int, labels: int = 4) -> Exemplars:
    rng = np.random.default_rng(0)
    vectors = {f"label{index}": rng.normal(size=(rows // labels, CHANNELS)).astype(np.float32)
               for index in range(labels)}
    return Exemplars.of(vectors, dict.fromkeys(vectors, 3))


def test_a_prediction_uses_the_exemplars_matrix_as_it_is():
    exemplars = _exemplars(2000)  # 49 MiB of float32
    features = _features(0)
    names = [*exemplars.names[:3], "not taught"]  # one taught label gone from the config, too
    tracemalloc.start()
    try:
        q = exemplar_probabilities(features, exemplars, names)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert q.shape == (GRID * GRID, 4) and q[:, 3].max() == 0
    cells = features.size * 4  # the features as float32 (26 MB): the one copy made
    print(f"exemplar probabilities against {exemplars.matrix.nbytes / MiB:.0f} MiB of exemplars: "
          f"peak {peak / MiB:.1f} MiB traced")
    assert peak < cells + 2 * MiB  # no copy of the memory, not even of the labels asked for


def test_each_process_keeps_exemplars_within_its_bound_least_recently_used_first(tmp_path):
    bounds = MemoryBounds(label_bytes=8 * MiB, project_bytes=8 * MiB)
    store = SharedMemoryStore(FileStore(tmp_path))
    for project in ("1", "2", "3"):
        memory = Memory("fp", CHANNELS, bounds)
        cells = _features(2)[:, :8].reshape(CHANNELS, -1).T.copy()  # 256 cells
        memory.learn("7", {"rust": LabelExamples(cells[:1].copy(), cells)})
        store.save(project, "fp", memory.to_bytes())
    one = Exemplars.from_memory(Memory.from_bytes(store.load("1", "fp"), bounds)).nbytes  # 257 rows: 6.4 MiB
    memories = ProjectMemories(store, bounds, cache_bytes=2 * one + one // 2)
    for project in ("1", "2", "1", "3"):  # 2 is the least recently used when 3 comes
        assert memories.exemplars(project, "fp") is not None
    assert memories.cached_bytes == 2 * one
    reads = []
    original = store.load
    monkeypatched = lambda project, fingerprint: reads.append(project) or original(project, fingerprint)  # noqa: E731
    store.load = monkeypatched
    for project in ("1", "3", "2"):
        memories.exemplars(project, "fp")
    assert reads == ["2"] and memories.cached_bytes <= 2 * one + one // 2
    assert ProjectMemories(store, bounds, cache_bytes=one - 1).exemplars("1", "fp") is not None
