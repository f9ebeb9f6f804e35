"""The project memory: per-annotation exemplars, bounded in bytes, to and from bytes without pickle."""

import numpy as np
import pytest

from backend.pipeline.encoding import Encoding
from backend.pipeline.memory import (UNLABELED, ProcessStore, LabelExamples, Memory, MemoryBounds,
                                     MemoryFormatError, Source)
from backend.pipeline.teaching import AnnotatedRegion, cell_coverage, taught_examples, teach

CHANNELS = 8
ROOMY = MemoryBounds(label_bytes=1 << 20, project_bytes=1 << 22)


def examples(regions: int, cells: int, value: float = 1.0) -> LabelExamples:
    rng = np.random.default_rng(regions * 100 + cells)
    return LabelExamples(np.full((regions, CHANNELS), value, np.float16),
                         rng.normal(size=(cells, CHANNELS)).astype(np.float16))


def test_updating_an_annotation_replaces_what_it_taught_and_deleting_removes_it():
    memory = Memory("fp", CHANNELS, ROOMY)
    memory.learn("a1", {"rust": examples(1, 10)})
    memory.learn("a2", {"rust": examples(2, 5), "moss": examples(1, 3)})
    assert memory.regions_taught("rust") == 3 and memory.vectors("rust").shape == (3 + 15, CHANNELS)
    memory.learn("a1", {"moss": examples(1, 4)})  # the annotator relabelled a1's region
    assert memory.regions_taught("rust") == 2 and memory.regions_taught("moss") == 2
    assert memory.forget("a2") and not memory.forget("a2")
    assert memory.labels == ["moss"] and memory.vectors("moss").shape == (1 + 4, CHANNELS)
    memory.learn("a1", {})
    assert memory.annotations == {} and memory.labels == []


def test_revision_grows_with_every_change_only():
    memory = Memory("fp", CHANNELS, ROOMY)
    revisions = [memory.revision]
    for change in (lambda: memory.learn("a", {"rust": examples(1, 1)}), lambda: memory.learn("a", {"rust": examples(1, 2)}),
                   lambda: memory.forget("a"), lambda: memory.learn("b", {"rust": examples(1, 1)}), memory.clear):
        assert change()
        revisions.append(memory.revision)
    assert revisions == sorted(set(revisions))
    assert not memory.forget("never taught") and not memory.clear()
    assert memory.revision == revisions[-1]


def test_an_update_that_changes_nothing_leaves_the_revision():
    memory = Memory("fp", CHANNELS, ROOMY)
    memory.learn("a", {"rust": examples(1, 3)}, Source("1", "2026-12-03T09:00:00Z"))
    revision = memory.revision
    assert memory.learn("a", {"rust": examples(1, 3)}, Source("1", "2026-12-03T09:05:00Z"))  # its time is kept...
    assert memory.revision == revision  # ...but the examples are the same
    assert not memory.learn("a", {"rust": examples(1, 3)}, Source("1", "2026-12-03T09:05:00Z"))
    rebuilt = Memory("fp", CHANNELS, ROOMY)
    rebuilt.learn("a", {"rust": examples(1, 3)}, Source("1", "2026-12-03T09:05:00Z"))
    assert not memory.replace(rebuilt) and memory.revision == revision


def test_a_learn_that_read_an_annotation_before_its_delete_or_a_newer_version_is_refused():
    memory = Memory("fp", CHANNELS, ROOMY)
    memory.learn("a", {"rust": examples(1, 3)}, Source("1", "2026-12-03T09:05:00.500000Z"))
    assert not memory.learn("a", {"moss": examples(1, 3)}, Source("1", "2026-12-03T09:05:00Z"))  # older
    assert memory.labels == ["rust"]
    assert memory.forget("b", deleted=True)  # deleted before its learn wrote: refused from now on
    assert not memory.learn("b", {"rust": examples(1, 2)}, Source("1", "2026-12-03T09:06:00Z"))
    assert memory.forget_tasks(["1"]) and memory.annotations == {}
    assert not memory.learn("c", {"rust": examples(1, 2)}, Source("1"))  # another annotation of the deleted task
    rebuilt = Memory("fp", CHANNELS, ROOMY)  # a rebuild that listed the task before it was deleted
    rebuilt.learn("a", {"rust": examples(1, 3)}, Source("1"))
    rebuilt.learn("d", {"moss": examples(1, 3)}, Source("2"))
    assert memory.replace(rebuilt) and list(memory.annotations) == ["d"]
    back = Memory.from_bytes(memory.to_bytes(), ROOMY)
    assert (back.deleted_annotations, back.deleted_tasks) == ({"a", "b"}, {"1"})
    assert back.sources == {"d": Source("2")}
    # updated after a rebuild read it: the rebuild keeps the newer version
    memory.learn("d", {"rust": examples(2, 2)}, Source("2", "2026-12-03T09:10:00Z"))
    stale = Memory("fp", CHANNELS, ROOMY)
    stale.learn("d", {"moss": examples(1, 3)}, Source("2", "2026-12-03T09:00:00Z"))
    assert not memory.replace(stale) and memory.labels == ["rust"]


def test_bounds_per_label_thin_the_largest_sample_first_and_keep_every_annotation():
    vector = CHANNELS * 2  # bytes of one float16 vector
    memory = Memory("fp", CHANNELS, MemoryBounds(label_bytes=40 * vector, project_bytes=1 << 20))
    memory.learn("big", {"rust": examples(1, 64)})
    assert memory.label_bytes("rust") <= 40 * vector and len(memory.annotations["big"]["rust"].cells) == 32
    memory.learn("small", {"rust": examples(1, 10)})  # 33 + 11 vectors: over the bound
    assert memory.label_bytes("rust") <= 40 * vector
    assert len(memory.annotations["small"]["rust"].cells) == 10  # the newcomer keeps its cells
    assert len(memory.annotations["big"]["rust"].cells) == 16


def test_bounds_per_project_drop_cells_then_the_oldest_annotations():
    vector = CHANNELS * 2
    memory = Memory("fp", CHANNELS, MemoryBounds(label_bytes=1 << 20, project_bytes=3 * vector))
    for index in range(5):
        memory.learn(f"a{index}", {"rust": examples(1, 4)})
        assert memory.nbytes <= 3 * vector
    assert list(memory.annotations) == ["a2", "a3", "a4"]  # one prototype each, the newest
    assert all(len(taught["rust"].cells) == 0 for taught in memory.annotations.values())


def test_bytes_round_trip_exactly_and_carry_fingerprint_and_revision():
    memory = Memory("fp123", CHANNELS, ROOMY)
    memory.learn("a1", {"rust": examples(2, 7), UNLABELED: examples(1, 9)})
    memory.learn("a2", {"moss": examples(1, 0)})
    back = Memory.from_bytes(memory.to_bytes(), ROOMY)
    assert (back.fingerprint, back.channels, back.revision) == ("fp123", CHANNELS, memory.revision)
    assert list(back.annotations) == ["a1", "a2"] and back.labels == memory.labels
    for label in memory.labels:
        np.testing.assert_array_equal(back.vectors(label), memory.vectors(label))
    assert Memory.from_bytes(Memory("fp", CHANNELS, ROOMY).to_bytes(), ROOMY).annotations == {}


def test_loading_applies_lowered_bounds():
    memory = Memory("fp", CHANNELS, ROOMY)
    memory.learn("a1", {"rust": examples(1, 100)})
    small = MemoryBounds(label_bytes=20 * CHANNELS * 2, project_bytes=1 << 20)
    assert Memory.from_bytes(memory.to_bytes(), small).label_bytes("rust") <= small.label_bytes


@pytest.mark.parametrize("data", [b"", b"not a memory", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_malformed_bytes_are_refused(data):
    with pytest.raises(MemoryFormatError):
        Memory.from_bytes(data, ROOMY)


def test_bytes_whose_counts_do_not_match_their_arrays_are_refused():
    memory = Memory("fp", CHANNELS, ROOMY)
    memory.learn("a1", {"rust": examples(2, 3)})
    data = memory.to_bytes().replace(b'2, 3]', b'2, 4]')
    assert data != memory.to_bytes()
    with pytest.raises(MemoryFormatError, match="add up"):
        Memory.from_bytes(data, ROOMY)


def test_in_memory_store_keeps_projects_and_fingerprints_apart():
    store = ProcessStore()
    store.save("1", "fp", b"one")
    store.save("2", "fp", b"two")
    store.save("1", "other", b"other models")
    assert (store.load("1", "fp"), store.load("2", "fp"), store.load("1", "other")) == (b"one", b"two", b"other models")
    store.delete("1", "fp")
    assert store.load("1", "fp") is None and store.load("2", "fp") == b"two"


def encoding_of(features: np.ndarray, height: int, width: int) -> Encoding:
    return Encoding(features=features.astype(np.float16), image_embedding=np.zeros(4, np.float32), caption="",
                    width=width, height=height, fingerprint="fp")


def test_coverage_is_the_share_of_each_cell():
    mask = np.zeros((40, 80), bool)
    mask[:10, :20] = True  # one whole cell of a 4x4 grid (10 x 20 pixels each)
    mask[10:15, 20:40] = True  # half of the next cell down and right
    coverage = cell_coverage(mask, 4)
    assert coverage[0, 0] == pytest.approx(1.0) and coverage[1, 1] == pytest.approx(0.5)
    assert coverage.sum() == pytest.approx(1.5)


def test_taught_examples_are_region_prototypes_and_majority_cells():
    grid = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    features = np.concatenate([grid, np.ones((1, 4, 4), np.float32)])  # channel 0: the cell's index
    encoding = encoding_of(features, 40, 40)
    rust = np.zeros((40, 40), bool)
    rust[:10, :20] = True  # cells 0 and 1
    rust[10:14, :10] = True  # 40 % of cell 4: in the prototype, not among the cells
    ignored = np.zeros((40, 40), bool)
    ignored[30:, :] = True  # the last row of cells teaches nothing
    taught = taught_examples(encoding, [AnnotatedRegion("rust", rust)], ignored)
    assert sorted(taught) == [UNLABELED, "rust"]
    assert sorted(taught["rust"].cells[:, 0].tolist()) == [0, 1]
    assert taught["rust"].prototypes[0, 0] == pytest.approx((0 + 1 + 0.4 * 4) / 2.4, rel=1e-3)
    assert sorted(taught[UNLABELED].cells[:, 0].tolist()) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert taught_examples(encoding, []) == {}


def test_teach_refuses_features_of_other_models():
    encoding = encoding_of(np.ones((CHANNELS, 4, 4)), 8, 8)
    with pytest.raises(ValueError, match="other models"):
        teach(Memory("another", CHANNELS, ROOMY), "a", encoding, [AnnotatedRegion("rust", np.ones((8, 8), bool))])
