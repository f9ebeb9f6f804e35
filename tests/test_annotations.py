"""Label Studio annotations to masks at the image's size, for learning from them."""

import tracemalloc

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from backend.labelstudio.annotations import BrushSizeError, annotation_regions, decode_brush, polygon_mask

HEIGHT, WIDTH = 40, 60


def brush(label: str, mask: np.ndarray, from_name: str = "tag") -> dict:
    rle = [int(v) for v in mask2rle(np.where(mask, 255, 0).astype(np.uint8))]
    return {"id": label, "from_name": from_name, "to_name": "image", "type": "brushlabels",
            "original_height": mask.shape[0], "original_width": mask.shape[1],
            "value": {"format": "rle", "rle": rle, "brushlabels": [label]}}


def polygon(label: str, points: list[list[float]], from_name: str = "tag") -> dict:
    return {"id": label, "from_name": from_name, "to_name": "image", "type": "polygonlabels",
            "original_height": HEIGHT, "original_width": WIDTH,
            "value": {"points": points, "closed": True, "polygonlabels": [label]}}


def test_brush_and_polygon_regions_become_masks_at_the_image_size():
    rust = np.zeros((HEIGHT, WIDTH), bool)
    rust[5:15, 10:30] = True
    results = [brush("rust", rust), polygon("moss", [[50, 50], [100, 50], [100, 100], [50, 100]]),
               {"type": "choices", "value": {"choices": ["ok"]}}, brush("unlabelled", rust) | {"value": {}}]
    regions = annotation_regions(results, HEIGHT, WIDTH)
    assert [r.label for r in regions] == ["rust", "moss"]
    np.testing.assert_array_equal(regions[0].mask, rust)
    moss = regions[1].mask
    assert moss[20:, 30:].all() and not moss[:19].any() and not moss[:, :29].any()


def test_a_brush_of_another_size_is_resized_and_a_broken_one_skipped():
    half = np.zeros((HEIGHT // 2, WIDTH // 2), bool)
    half[:10, :] = True  # the top half
    broken = brush("moss", half)
    broken["value"]["rle"] = [1, 2, 3]
    regions = annotation_regions([brush("rust", half), broken], HEIGHT, WIDTH)
    assert [r.label for r in regions] == ["rust"]
    assert regions[0].mask[:20].all() and not regions[0].mask[20:].any()


def test_only_the_named_control_is_read():
    results = [polygon("rust", [[0, 0], [50, 0], [50, 50]], from_name="a"),
               polygon("moss", [[0, 0], [50, 0], [50, 50]], from_name="b")]
    assert [r.label for r in annotation_regions(results, HEIGHT, WIDTH, from_name="b")] == ["moss"]


def test_a_degenerate_polygon_covers_nothing():
    assert not polygon_mask([[10, 10], [20, 20]], HEIGHT, WIDTH).any()
    assert annotation_regions([polygon("rust", [[10, 10], [20, 20]])], HEIGHT, WIDTH) == []


def _claiming_rle(height: int, width: int, size: int) -> list[int]:
    """``size`` bytes of RLE whose header claims ``height`` x ``width`` x 4 values, then runs of 65,536 zeros."""
    header = (format(height * width * 4, "032b") + format(7, "05b")
              + "".join(format(bits - 1, "04b") for bits in (3, 4, 8, 16)))
    long_run = "1" + "11" + format(2**16 - 1, "016b") + "0" * 8
    bits = header + long_run * ((size * 8 - len(header)) // len(long_run))
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


def test_a_brush_claiming_more_pixels_than_the_image_is_refused_before_any_allocation():
    # The reproduction: 270 KB of RLE claiming 16384 x 16384 (1 GB of values once decoded).
    forged = brush("rust", np.ones((2, 2), bool))
    forged.update(original_height=16384, original_width=16384)
    forged["value"]["rle"] = _claiming_rle(16384, 16384, 270_000)
    assert 260_000 < len(forged["value"]["rle"]) <= 270_000
    tracemalloc.start()
    try:
        with pytest.raises(BrushSizeError, match="FREESEG_MAX_IMAGE_PIXELS") as refused:
            annotation_regions([forged], HEIGHT, WIDTH)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.kind == "annotation_too_large"
    assert peak < 16 * 1024**2, peak  # nothing of the declared size was allocated
    # The pixel limit holds where no image size is known (feedback), and a normal brush still decodes.
    with pytest.raises(BrushSizeError):
        decode_brush(forged, max_pixels=50_000_000)
    rust = np.zeros((HEIGHT, WIDTH), bool)
    rust[5:15, 10:30] = True
    np.testing.assert_array_equal(decode_brush(brush("rust", rust), max_pixels=HEIGHT * WIDTH), rust)
