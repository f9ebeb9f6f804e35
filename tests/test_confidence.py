"""The confidence a prediction's score carries: margin, exemplar agreement, share under untaught labels."""

import numpy as np
import pytest

from backend.pipeline.confidence import Confidence, cell_confidence, clip_confidence
from backend.pipeline.exemplars import Exemplars, label_with_exemplars
from backend.pipeline.labelling import ClusterLabel
from backend.pipeline.memory import UNLABELED
from backend.pipeline.vocabulary import Label

LABELS = [Label("rust"), Label("moss"), Label("sky")]


def unit_features(axes: np.ndarray, channels: int = 4) -> np.ndarray:
    """(C, G, G) features: each cell the unit vector of its axis."""
    return np.eye(channels)[axes].transpose(2, 0, 1).astype(np.float16)


def test_margin_is_the_lead_over_the_second_label_and_untaught_keeps_half():
    scores = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.2, 0.5, 0.3]], np.float32)
    chosen = np.array([0, 0, 0])
    untaught = np.zeros(3, bool)
    np.testing.assert_allclose(cell_confidence(scores, chosen, np.zeros(3), untaught), [0.25, 0.025, 0.0], atol=1e-6)
    # taught, the memory agreeing fully: the whole margin
    np.testing.assert_allclose(cell_confidence(scores, chosen, np.ones(3), ~untaught), [0.5, 0.05, 0.0], atol=1e-6)


def test_clip_confidence_counts_unlabelled_clusters_as_zero():
    grid = np.array([[0, 0], [1, 1]])
    clip = np.array([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2]], np.float32)
    confidence = clip_confidence(grid, clip, [ClusterLabel(cluster=0, label=0, score=0.9)])
    assert confidence.regions == pytest.approx((0.425,))
    assert confidence.image == pytest.approx(0.2125)  # half the cells labelled by nobody


def test_a_memory_that_agrees_raises_the_confidence_and_one_that_disagrees_lowers_it():
    axes = np.zeros((4, 4), int)  # every cell on the rust axis
    clusters = np.zeros((4, 4), int)
    clip = np.array([[0.6, 0.3, 0.1]], np.float32)  # CLIP says rust, not sure
    alike = Exemplars.of({"rust": np.stack([np.eye(4)[0]] * 12), UNLABELED: np.stack([np.eye(4)[2]] * 12)},
                         {"rust": 4, UNLABELED: 4})
    # one region each: too little to outvote CLIP's rust, enough to dispute it (these cells look like moss)
    elsewhere = Exemplars.of({"rust": np.stack([np.eye(4)[1]] * 12), "moss": np.stack([np.eye(4)[0]] * 12)},
                             {"rust": 1, "moss": 1})
    without = clip_confidence(clusters, clip, [ClusterLabel(0, 0, 0.6)])
    _, assigned, agreeing = label_with_exemplars(unit_features(axes), clusters, clip, [0], LABELS, alike, 4, 4)
    _, disputed, disagreeing = label_with_exemplars(unit_features(axes), clusters, clip, [0], LABELS, elsewhere, 4, 4)
    assert [LABELS[a.label].name for a in assigned] == [LABELS[a.label].name for a in disputed] == ["rust"]
    assert agreeing.image > without.image and agreeing.regions[0] > 0.5
    assert disagreeing.image < without.image
    for confidence in (without, agreeing, disagreeing):
        assert 0 <= confidence.image <= 1 and all(0 <= c <= 1 for c in confidence.regions)


def test_the_share_under_untaught_labels_lowers_the_image_confidence():
    axes = np.zeros((4, 4), int)
    axes[:, 2:] = 1  # rust on the left, moss on the right
    clusters = (axes == 1).astype(int)
    clip = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]], np.float32)
    rust_taught = Exemplars.of({"rust": np.stack([np.eye(4)[0]] * 12)}, {"rust": 4})
    _, assigned, confidence = label_with_exemplars(unit_features(axes), clusters, clip, [0, 1], LABELS,
                                                   rust_taught, 4, 4)
    by_name = {LABELS[a.label].name: c for a, c in zip(assigned, confidence.regions)}
    assert by_name["moss"] < by_name["rust"]
    everything_taught = Exemplars.of({"rust": np.stack([np.eye(4)[0]] * 12), "moss": np.stack([np.eye(4)[1]] * 12)},
                                     {"rust": 4, "moss": 4})
    _, _, taught = label_with_exemplars(unit_features(axes), clusters, clip, [0, 1], LABELS, everything_taught, 4, 4)
    assert taught.image > confidence.image


def test_of_cells_averages_regions_and_image():
    confidence = Confidence.of_cells(np.array([1.0, 0.5, 0.0, 0.0]), [np.array([True, True, False, False])])
    assert confidence == Confidence((0.75,), 0.375)


def test_a_prediction_scores_its_confidence(tiny_segmenter, china):
    from backend.options import SegmentOptions
    from backend.pipeline.vocabulary import labels_from_names

    segmentation = tiny_segmenter.segment_image(china, labels_from_names(["building", "tree", "sky"]),
                                                SegmentOptions(k=4, refine="none", use_caption=False))
    assert segmentation.regions and 0 <= segmentation.score <= 1
    assert all(0 <= region.score <= 1 for region in segmentation.regions)
    # the image's confidence counts every cell, so it is at most the best region's
    assert segmentation.score <= max(region.score for region in segmentation.regions)
