"""A Label Studio annotation's regions as masks at the image's size (for learning from it).

``brushlabels`` results carry an RLE of the RGBA mask (decoded with Label Studio's own
converter; alpha > 0 is the region); ``polygonlabels`` results carry points in percent of the
image's width and height, filled here. Every other result type, and regions without a label,
teach nothing. A brush mask of another size than the image is resized to it (nearest).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from backend.pipeline.teaching import AnnotatedRegion

log = logging.getLogger(__name__)


def decode_brush(result: dict) -> np.ndarray | None:
    """A brush result's (H, W) boolean mask at its ``original_height`` x ``original_width``, or None, logged."""
    try:
        height, width = int(result["original_height"]), int(result["original_width"])
        value = result["value"]
        if value.get("format") != "rle":
            raise ValueError(f"format {value.get('format')!r} is not rle")
        rle = value["rle"]
        expected = height * width * 4
        # The first 32 bits give the decoded length: check it before decode_rle allocates it.
        if height <= 0 or width <= 0 or int.from_bytes(bytes(rle[:4]), "big") != expected:
            raise ValueError(f"RLE does not encode {height}x{width}x4 values")
        return decode_rle(rle).reshape(height, width, 4)[:, :, 3] > 0
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as error:
        log.warning("skipping brush region %r of %r: %s", result.get("id"), result.get("from_name"), error)
        return None


def polygon_mask(points: Iterable[Iterable[float]], height: int, width: int) -> np.ndarray:
    """The (H, W) boolean mask of a polygon whose points are in percent of the width and height."""
    pixels = np.array([[float(x) * width / 100.0, float(y) * height / 100.0] for x, y in points], np.float64)
    mask = np.zeros((height, width), np.uint8)
    if len(pixels) >= 3 and np.isfinite(pixels).all():
        cv2.fillPoly(mask, [np.round(pixels).astype(np.int32)], 1)
    return mask.astype(bool)


def annotation_regions(results: list[dict], height: int, width: int,
                       from_name: str | None = None) -> list[AnnotatedRegion]:
    """The labelled brush and polygon regions of an annotation's ``result`` list, at H x W.

    ``from_name`` given: only that control's regions (a project may have several).
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
    mask = decode_brush(result)
    if mask is not None and mask.shape != (height, width):
        mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask
