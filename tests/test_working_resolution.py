"""Refinement at a working resolution: today's masks at or below FREESEG_WORKING_MAX_SIDE, full-size masks above it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from backend.pipeline.refine import Refiner, refine_masks
from backend.options import SegmentOptions
from backend.pipeline.segmenter import Click, Segmenter
from backend.pipeline.upsampling import guided_upsample, nearest_upsample, working_image, working_size
from backend.pipeline.vocabulary import labels_from_names

METHODS = ("crf", "pamr", "none")
LABELS = labels_from_names(["building", "tree", "sky", "person"])


def disc_picture(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc on a dark, slightly noisy background, and the disc's mask."""
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 <= (0.3 * height) ** 2
    noise = np.random.default_rng(0).normal(0, 4, (height, width, 3))
    image = np.clip(np.where(disc, 200.0, 60.0)[..., None] + noise, 0, 255).astype(np.uint8)
    return image, disc


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def twin(segmenter: Segmenter, working_max_side: int | None) -> Segmenter:
    return Segmenter(segmenter.captioner, segmenter.features, segmenter.clip, segmenter.nlp, segmenter.fingerprint,
                     segmenter.device, refiner=Refiner("cpu"), working_max_side=working_max_side)


def test_working_size_bounds_the_longest_side_and_keeps_the_aspect():
    assert working_size(427, 640, 640) == (427, 640)
    assert working_size(427, 640, None) == (427, 640)
    assert working_size(4000, 6000, 640) == (427, 640)
    assert working_size(6000, 4000, 640) == (640, 427)
    image = np.zeros((300, 200, 3), np.uint8)
    assert working_image(image, 300) is image  # at the bound: not even copied
    assert working_image(image, 150).shape == (150, 100, 3)


@pytest.mark.parametrize("method", METHODS)
def test_a_full_image_of_the_working_size_changes_nothing(method):
    image, disc = disc_picture(120, 160)
    masks = np.stack([nearest_upsample(disc[None, ::8, ::8], 120, 160)[0], ~disc])
    expected = refine_masks(image, masks, method)
    assert np.array_equal(refine_masks(image, masks, method, full_image=image), expected)
    assert np.array_equal(refine_masks(image, masks, method, full_image=image.copy()), expected)


@pytest.mark.parametrize("method", METHODS)
def test_above_the_bound_masks_are_full_size_disjoint_and_the_first_wins(method):
    full, _ = disc_picture(600, 900)
    small = working_image(full, 150)
    masks = np.zeros((3,) + small.shape[:2], dtype=bool)
    masks[0, 10:70, 10:90] = True
    masks[1, 40:95, 60:140] = True  # overlaps mask 0
    masks[2] = True  # overlaps both
    out = refine_masks(small, masks, method, full_image=full)
    assert out.shape == (3, 600, 900) and out.dtype == np.bool_
    assert not (out[0] & out[1]).any() and not (out[0] & out[2]).any() and not (out[1] & out[2]).any()
    assert out.any(axis=0).all()  # the whole-image mask takes what the others left
    shared = np.zeros((600, 900), dtype=bool)
    shared[40 * 6 + 30 : 70 * 6 - 30, 60 * 6 + 30 : 90 * 6 - 30] = True  # well inside both masks 0 and 1
    assert out[0][shared].mean() > 0.9 and not out[1][shared].any()


def test_above_the_bound_the_crf_processes_give_the_in_line_masks():
    full, disc = disc_picture(500, 700)
    small = working_image(full, 175)
    blocky = nearest_upsample(disc[None, ::50, ::50], *small.shape[:2])[0]
    masks = np.stack([blocky, np.ones(small.shape[:2], bool)])
    refiner = Refiner("cpu", crf_processes=2)
    try:
        in_processes = refiner.start(small, masks, "crf", full_image=full)()
    finally:
        refiner.close()
    assert np.array_equal(in_processes, refine_masks(small, masks, "crf", full_image=full))


def test_guided_upsampling_follows_the_full_image_edges():
    full, disc = disc_picture(1200, 1600)
    small = working_image(full, 200)
    small_disc = cv2.resize(disc.view(np.uint8), small.shape[1::-1], interpolation=cv2.INTER_AREA) > 0
    guided = guided_upsample(small_disc[None], small, full)[0]
    blocky = nearest_upsample(small_disc[None], 1200, 1600)[0]
    assert iou(guided, disc) > 0.995  # measured 1.000
    assert iou(guided, disc) - iou(blocky, disc) > 0.005  # nearest: 0.990


def test_guided_upsampling_filters_only_along_edges_with_the_same_result():
    """The tiles it skips are those where the full-resolution guided filter gives the mask itself."""
    full, _ = disc_picture(900, 1300)
    full[::7] = 255 - full[::7]  # stripes: edges everywhere in the guide
    small = working_image(full, 260)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    masks = np.stack([grey > 100, np.zeros_like(grey, bool), cv2.GaussianBlur(grey, (0, 0), 6) > 90])
    expected = _full_resolution_guided_filter(masks, small, full)
    assert np.array_equal(guided_upsample(masks, small, full), expected)


def _full_resolution_guided_filter(masks: np.ndarray, small: np.ndarray, full: np.ndarray) -> np.ndarray:
    from backend.pipeline import upsampling

    height, width = full.shape[:2]
    guide, full_guide = upsampling._grey(small), upsampling._grey(full)
    box = upsampling._box
    mean_guide = box(guide)
    variance = box(guide * guide) - mean_guide**2
    out = []
    for mask in masks:
        soft = mask.astype(np.float32)
        slope = (box(guide * soft) - mean_guide * box(soft)) / (variance + upsampling.GUIDED_EPS)
        offset = box(soft) - slope * mean_guide
        up = [cv2.resize(box(v), (width, height), interpolation=cv2.INTER_LINEAR) for v in (slope, offset)]
        out.append(up[0] * full_guide + up[1] > 0.5)
    return np.stack(out)


@pytest.mark.parametrize("refine", ["crf", "none"])
def test_at_the_bound_the_segmenter_gives_exactly_the_unbounded_masks(tiny_segmenter, china, refine):
    options = SegmentOptions(k=4, refine=refine)
    unbounded = twin(tiny_segmenter, None).segment_image(china, LABELS, options)
    bounded = twin(tiny_segmenter, max(china.shape[:2])).segment_image(china, LABELS, options)
    np.testing.assert_array_equal(bounded.label_map, unbounded.label_map)
    assert bounded.regions == unbounded.regions and bounded.regions


def test_above_the_bound_the_segmenter_answers_at_full_size(tiny_segmenter, china):
    big = cv2.resize(china, (1600, 1068), interpolation=cv2.INTER_CUBIC)
    segmenter = twin(tiny_segmenter, 400)
    result = segmenter.segment_image(big, LABELS, SegmentOptions(k=4, refine="crf"))
    assert result.label_map.shape == (1068, 1600) and result.regions
    assert set(np.unique(result.label_map)) <= {0} | {region.label + 1 for region in result.regions}
    click = Click(x=1500, y=1000, label=2)
    clicked = segmenter.propose_clicks(segmenter.encode(big), big, LABELS, [click], SegmentOptions(k=4, refine="none")).finish()
    assert clicked.label_map.shape == (1068, 1600) and clicked.label_map[1000, 1500] == 3
