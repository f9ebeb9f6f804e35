"""A Label Studio annotation's regions as masks at the image's size (for learning from it).

``brushlabels`` results carry an RLE of the RGBA mask (decoded with Label Studio's own
converter; alpha > 0 is the region); ``polygonlabels`` results carry points in percent of the
image's width and height, filled here. Every other result type, and regions without a label,
teach nothing. A brush mask of another size than the image is resized to it (nearest).

A brush result declares its size twice (``original_width`` x ``original_height`` and the RLE's
32-bit value count), and the decoder allocates what it declares: both are checked against a pixel
limit (FREESEG_MAX_IMAGE_PIXELS, and the task image's own size when it is known) before anything
is decoded, and a result over it is refused (``BrushSizeError``), not skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from backend.images import ImageLimits
from backend.pipeline.coordinates import PERCENT, to_frame
from backend.pipeline.teaching import AnnotatedRegion

log = logging.getLogger(__name__)

MAX_BRUSH_PIXELS = ImageLimits().max_pixels  # FREESEG_MAX_IMAGE_PIXELS's default, for callers without settings
_MAX_BITS_PER_VALUE = 16  # the RLE's costliest field, a single 8-bit value, takes 14 bits: a longer RLE is not one


class BrushSizeError(ValueError):
    """A brush result declares more pixels than the limit; ``kind`` is ``annotation_too_large``."""

    kind = "annotation_too_large"


def decode_brush(result: dict, max_pixels: int = MAX_BRUSH_PIXELS) -> np.ndarray | None:
    """A brush result's (H, W) boolean mask at its ``original_height`` x ``original_width``, or None, logged.

    Raises ``BrushSizeError`` when it declares more than ``max_pixels`` pixels, before decoding anything.
    """
    try:
        height, width = int(result["original_height"]), int(result["original_width"])
        value = result["value"]
        if value.get("format") != "rle":
            raise ValueError(f"format {value.get('format')!r} is not rle")
        rle = value["rle"]
        _check_brush_size(height, width, max_pixels)
        expected = height * width * 4
        # The first 32 bits give the decoded length: check it before decode_rle allocates it.
        if height <= 0 or width <= 0 or int.from_bytes(bytes(rle[:4]), "big") != expected:
            raise ValueError(f"RLE does not encode {height}x{width}x4 values")
        if len(rle) * 8 > expected * _MAX_BITS_PER_VALUE + 64:  # decode_rle spells out every bit as a character
            raise ValueError(f"RLE of {len(rle)} bytes is too long for {height}x{width}x4 values")
        return decode_rle(rle).reshape(height, width, 4)[:, :, 3] > 0
    except BrushSizeError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as error:
        log.warning("skipping brush region %r of %r: %s", result.get("id"), result.get("from_name"), error)
        return None


def _check_brush_size(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise BrushSizeError(f"a brush region declares {width}x{height} pixels, over the limit of {max_pixels} "
                             f"(FREESEG_MAX_IMAGE_PIXELS, or the task image's own size): refused")


def polygon_mask(points: Iterable[Iterable[float]], height: int, width: int) -> np.ndarray:
    """The (H, W) boolean mask of a polygon whose points are in percent of the width and height."""
    pixels = np.array([to_frame(float(x), float(y), PERCENT, (width, height)) for x, y in points], np.float64)
    mask = np.zeros((height, width), np.uint8)
    if len(pixels) >= 3 and np.isfinite(pixels).all():
        cv2.fillPoly(mask, [np.round(pixels).astype(np.int32)], 1)
    return mask.astype(bool)


def annotation_regions(results: list[dict], height: int, width: int,
                       from_name: str | None = None) -> list[AnnotatedRegion]:
    """The labelled brush and polygon regions of an annotation's ``result`` list, at H x W.

    ``from_name`` given: only that control's regions (a project may have several). A brush region
    declaring more pixels than the H x W image raises ``BrushSizeError``.
    """
    regions = []
    for result in results:
        kind = result.get("type")
        value = result.get("value")
        if kind not in ("brushlabels", "polygonlabels") or not isinstance(value, dict):
            continue
        if from_name is not None and result.get("from_name") != from_name:
            continue
        names = [name for name in value.get(kind) or [] if isinstance(name, str)]
        mask = _region_mask(kind, result, value, height, width) if names else None
        if mask is not None and mask.any():
            regions += [AnnotatedRegion(name, mask) for name in names]
    return regions


def _region_mask(kind: str, result: dict, value: dict, height: int, width: int) -> np.ndarray | None:
    if kind == "polygonlabels":
        try:
            return polygon_mask(value.get("points") or [], height, width)
        except (TypeError, ValueError) as error:
            log.warning("skipping polygon region %r of %r: %s", result.get("id"), result.get("from_name"), error)
            return None
    mask = decode_brush(result, max_pixels=height * width)
    if mask is not None and mask.shape != (height, width):
        mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask
