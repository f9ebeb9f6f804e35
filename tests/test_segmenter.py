"""The tiny profile end to end through encode and segment: contracts users rely on."""

import io

import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image
from sklearn.datasets import load_sample_image

from backend.images import decode_image
from backend.exports.brush_results import brush_results
from backend.pipeline.encoding import Encoding
from backend.pipeline.refine import Refiner
from backend.options import SegmentOptions
from backend.pipeline.segmenter import Segmenter
from backend.pipeline.vocabulary import labels_from_names

LABELS = labels_from_names(["building", "tree", "sky", "person"])
OPTIONS = SegmentOptions(k=4, refine="crf")


def test_encode_is_label_independent_and_compact(tiny_segmenter, china):
    encoding = tiny_segmenter.encode(china)
    assert encoding.features.dtype == np.float16 and encoding.features.ndim == 3
    assert encoding.features.shape[1:] == (32, 32)
    assert (encoding.width, encoding.height) == (640, 427)
    assert encoding.caption and encoding.fingerprint == tiny_segmenter.fingerprint


def test_segment_from_stored_encoding_equals_one_shot(tiny_segmenter, china):
    one_shot = tiny_segmenter.segment_image(china, LABELS, OPTIONS)
    stored = Encoding.from_bytes(tiny_segmenter.encode(china).to_bytes())
    again = tiny_segmenter.segment(stored, china, LABELS, OPTIONS)
    np.testing.assert_array_equal(again.label_map, one_shot.label_map)
    assert again.regions == one_shot.regions


def test_same_input_same_masks(tiny_segmenter, china):
    first = tiny_segmenter.segment_image(china, LABELS, OPTIONS)
    second = tiny_segmenter.segment_image(china, LABELS, OPTIONS)
    np.testing.assert_array_equal(first.label_map, second.label_map)


def test_a_real_photo_yields_labelled_regions(tiny_segmenter, china):
    result = tiny_segmenter.segment_image(china, LABELS, OPTIONS)
    assert result.regions, "the tiny profile must label something, or it tests nothing"
    assert {r.name for r in result.regions} <= {label.name for label in LABELS}


def test_brush_results_decode_to_the_image_size_without_overlap(tiny_segmenter, china):
    result = tiny_segmenter.segment_image(china, LABELS, SegmentOptions(k=5, refine="none"))
    results = brush_results(result, "tag", "image")
    assert results
    coverage = np.zeros(china.shape[:2], dtype=int)
    for region in results:
        assert (region["original_width"], region["original_height"]) == (640, 427)
        assert region["value"]["brushlabels"][0] in {label.name for label in LABELS}
        mask = np.reshape(decode_rle(region["value"]["rle"]), (427, 640, 4))[:, :, 3] > 0
        assert mask.any()
        coverage += mask
    assert coverage.max() == 1


def test_changing_k_changes_the_clusters_not_the_encoding(tiny_segmenter, china):
    encoding = tiny_segmenter.encode(china)
    options = SegmentOptions(k=2, refine="none", use_caption=False)
    two = tiny_segmenter.segment(encoding, china, LABELS, options)
    six = tiny_segmenter.segment(encoding, china, LABELS, SegmentOptions(k=6, refine="none", use_caption=False))
    assert len(np.unique(two.label_map)) <= 3 and len(six.regions) >= len(two.regions)


def test_encoding_of_another_image_size_is_refused(tiny_segmenter, china):
    encoding = tiny_segmenter.encode(china)
    with pytest.raises(ValueError, match="640x427"):
        tiny_segmenter.segment(encoding, china[:100], LABELS, OPTIONS)


def _png(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _exif_rotated_jpeg(china: np.ndarray) -> bytes:
    image = Image.fromarray(china)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda c: _exif_rotated_jpeg(c), (640, 427)),
        (lambda c: _png(c[:300, :120]), (300, 120)),
        (lambda c: _png(np.asarray(Image.fromarray(c).convert("L"))), (427, 640)),
        (lambda c: _png(np.dstack([c, np.full(c.shape[:2], 128, np.uint8)])), (427, 640)),
        (lambda c: _png((np.asarray(Image.fromarray(c).convert("L")).astype(np.uint16) * 257)), (427, 640)),
    ],
    ids=["exif-rotated", "non-square", "greyscale", "rgba", "16-bit"],
)
def test_unusual_images_segment_at_their_displayed_size(tiny_segmenter, china, make, shape):
    image = decode_image(make(china))
    result = tiny_segmenter.segment_image(image, LABELS, SegmentOptions(k=3, refine="none"))
    assert result.label_map.shape == shape
    for region in brush_results(result, "tag", "image"):
        assert (region["original_height"], region["original_width"]) == shape


def twin(segmenter: Segmenter, **kwargs) -> Segmenter:
    """A segmenter over the same models, arranged differently (refiner, caption thread)."""
    return Segmenter(segmenter.captioner, segmenter.features, segmenter.clip, segmenter.nlp, segmenter.fingerprint,
                     segmenter.device, **kwargs)


def test_the_batched_overlapped_pipeline_gives_the_masks_of_one_image_at_a_time(tiny_segmenter, china):
    images = [china, np.ascontiguousarray(china[::-1]), load_sample_image("flower.jpg")]
    in_line = twin(tiny_segmenter, refiner=Refiner("cpu", crf_processes=0))
    expected = [in_line.segment_image(image, LABELS, OPTIONS) for image in images]
    overlapped = twin(tiny_segmenter, refiner=tiny_segmenter.refiner, overlap_caption=True)
    assert overlapped.refiner.crf_processes > 0
    tagged = list(overlapped.segment_batches([("first", images[:2]), ("second", images[2:])], LABELS, OPTIONS))
    assert [(tag, len(batch)) for tag, batch in tagged] == [("first", 2), ("second", 1)]
    batches = [batch for _, batch in tagged]
    for got, want in zip(batches[0] + batches[1], expected):
        np.testing.assert_array_equal(got.label_map, want.label_map)
        assert (got.regions, got.caption, got.candidates) == (want.regions, want.caption, want.candidates)
    assert any(want.regions for want in expected)  # the comparison covers labelled regions


def test_a_batch_out_of_gpu_memory_is_encoded_in_halves_with_the_same_masks(tiny_segmenter, china):
    images = [china, np.ascontiguousarray(china[::-1])]
    expected = [segmentation.label_map for _, batch in tiny_segmenter.segment_batches([(0, images)], LABELS, OPTIONS)
                for segmentation in batch]
    sizes = []

    def features_within_one_image_of_memory(batch):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return tiny_segmenter.features(batch)

    small = Segmenter(tiny_segmenter.captioner, features_within_one_image_of_memory, tiny_segmenter.clip,
                      tiny_segmenter.nlp, tiny_segmenter.fingerprint, tiny_segmenter.device, tiny_segmenter.refiner)
    [(tag, segmentations)] = list(small.segment_batches([("both", images)], LABELS, OPTIONS))
    assert tag == "both" and sizes == [2, 1, 1]
    for got, want in zip(segmentations, expected):
        np.testing.assert_array_equal(got.label_map, want)
