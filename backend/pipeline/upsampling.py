"""Big images are refined at a working resolution; this brings the masks back to full size.

The dense CRF's kernels are in pixels (tuned on Pascal VOC's 500x375 images): on a
24-megapixel photo it costs seconds per mask and barely moves an edge. So images whose
longest side is above ``FREESEG_WORKING_MAX_SIDE`` are refined on a copy of that size,
and the refined masks are brought to full size by a guided filter (He, Sun and Tang,
"Guided Image Filtering", 2013) whose linear coefficients are computed at the working
size and applied to the full-resolution image ("Fast Guided Filter", He and Sun, 2015):
each mask edge follows the full-resolution image's edges within a few working pixels.
Images at or below the bound are never resized.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Guided-filter parameters, at the working resolution.
GUIDED_RADIUS = 2  # window radius in working pixels: an edge can move about this far at full size
GUIDED_EPS = 1e-3  # regulariser on the grey guide in [0, 1]: edges of contrast below ~0.03 are smoothed over
_THRESHOLD = 0.5  # the filtered soft mask keeps the pixels above this value
_TILE = 16  # working pixels per side of the tiles the filter runs on (those along a mask's edges)


def working_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(h, w) of an image whose longest side is at most ``max_side``, aspect kept; (height, width) when it fits."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def working_image(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """``image`` itself when it fits in ``max_side``, else a copy shrunk by area averaging."""
    height, width = working_size(*image.shape[:2], max_side)
    if (height, width) == image.shape[:2]:
        return image
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=cv2.INTER_AREA)


def nearest_upsample(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(R, height, width) bool masks from (R, h, w) ones, each pixel taking its nearest working pixel."""
    full = np.empty((len(masks), height, width), dtype=bool)
    for index, mask in enumerate(masks):
        full[index] = cv2.resize(np.ascontiguousarray(mask).view(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return full


def guided_upsample(masks: np.ndarray, image: np.ndarray, full_image: np.ndarray) -> np.ndarray:
    """(R, H, W) bool masks of ``full_image`` from (R, h, w) masks refined on ``image`` (its working copy).

    For each mask p, the guided filter fits q = a * I + b in every window of the working grey
    image I; a and b, averaged over the windows and interpolated bilinearly, are applied to
    the full-resolution grey image, and q is thresholded at one half. Where a mask is
    constant over everything a pixel's q depends on, q is that constant: there the mask is
    upsampled with nearest neighbours, and the filter runs only on the tiles along its edges.
    """
    height, width = full_image.shape[:2]
    guide = _grey(image)
    full_guide = cv2.cvtColor(np.ascontiguousarray(full_image), cv2.COLOR_RGB2GRAY)
    mean_guide = _box(guide)
    variance = _box(guide * guide) - mean_guide * mean_guide
    row_tiles = _tile_interpolations(height, guide.shape[0])
    column_tiles = _tile_interpolations(width, guide.shape[1])
    full = nearest_upsample(masks, height, width)
    for index, mask in enumerate(masks):
        soft = mask.astype(np.float32)
        mean_soft = _box(soft)
        slope = (_box(guide * soft) - mean_guide * mean_soft) / (variance + GUIDED_EPS)
        offset = mean_soft - slope * mean_guide
        mean_slope, mean_offset = _box(slope), _box(offset)
        for tile_row, tile_column in _edge_tiles(mask):
            rows, columns = row_tiles[tile_row], column_tiles[tile_column]
            window = (slice(*rows.source), slice(*columns.source))
            tile_slope = rows.weights @ mean_slope[window] @ columns.weights.T
            tile_offset = rows.weights @ mean_offset[window] @ columns.weights.T
            target = (slice(*rows.target), slice(*columns.target))
            tile_guide = full_guide[target] * np.float32(1 / 255)
            full[index][target] = tile_slope * tile_guide + tile_offset > _THRESHOLD
    return full


@dataclass(frozen=True)
class _TileInterpolation:
    """Bilinear interpolation along one axis of one tile: target = weights @ values[source]."""

    target: tuple[int, int]  # full-image start and stop
    source: tuple[int, int]  # working-image start and stop
    weights: np.ndarray  # (target length, source length) float32


def _tile_interpolations(full_length: int, working_length: int) -> list[_TileInterpolation]:
    """The interpolation of each tile along one axis, with cv2.resize's INTER_LINEAR mapping of pixel centres."""
    tiles = -(-working_length // _TILE)
    edges = [min(full_length, round(t * _TILE * full_length / working_length)) for t in range(tiles)] + [full_length]
    interpolations = []
    for start, stop in zip(edges[:-1], edges[1:]):
        position = (np.arange(start, stop) + 0.5) * (working_length / full_length) - 0.5
        below = np.floor(position)
        fraction = (position - below).astype(np.float32)
        first = np.clip(below.astype(np.int64), 0, working_length - 1)
        second = np.clip(below.astype(np.int64) + 1, 0, working_length - 1)
        low, high = int(first.min()) if len(first) else 0, int(second.max()) + 1 if len(second) else 0
        weights = np.zeros((stop - start, max(high - low, 0)), dtype=np.float32)
        np.add.at(weights, (np.arange(stop - start), first - low), 1 - fraction)
        np.add.at(weights, (np.arange(stop - start), second - low), fraction)
        interpolations.append(_TileInterpolation((start, stop), (low, high), weights))
    return interpolations


def _edge_tiles(mask: np.ndarray) -> list[tuple[int, int]]:
    """(row, column) of the tiles whose guided-filter output may differ from the mask.

    A pixel's output depends on the mask within two box radii of the (up to two by two)
    working pixels it interpolates between, which lie at most one pixel outside its tile;
    a tile is kept when that neighbourhood holds both values anywhere.
    """
    working_height, working_width = mask.shape
    reach = 2 * GUIDED_RADIUS + 2
    kernel = np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)
    values = np.ascontiguousarray(mask).view(np.uint8)
    mixed = cv2.dilate(values, kernel) != cv2.erode(values, kernel)
    tile_rows, tile_columns = -(-working_height // _TILE), -(-working_width // _TILE)
    padded = np.zeros((tile_rows * _TILE, tile_columns * _TILE), dtype=bool)
    padded[:working_height, :working_width] = mixed
    kept = padded.reshape(tile_rows, _TILE, tile_columns, _TILE).any(axis=(1, 3))
    return [(int(row), int(column)) for row, column in zip(*np.nonzero(kept))]


def _grey(image: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    return grey.astype(np.float32) * np.float32(1 / 255)


def _box(values: np.ndarray) -> np.ndarray:
    side = 2 * GUIDED_RADIUS + 1
    return cv2.boxFilter(values, -1, (side, side), borderType=cv2.BORDER_REFLECT)


