"""What an annotation teaches: its regions pooled onto the encoding's feature grid.

The feature grid covers the image squashed to a square, so a cell of a (G, G) grid is a
(H/G, W/G) block of the image. A region's coverage of a cell is the share of the block it
covers (an area average). A region's prototype is its coverage-weighted mean feature; a cell
teaches its features to the label that covers more than half of it. The pixels no region
covers teach ``UNLABELED`` the same way (pixels marked ignored teach nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from backend.pipeline.encoding import Encoding
from backend.pipeline.memory import UNLABELED, LabelExamples, Memory, Taught

MAJORITY = 0.5  # a cell teaches the label covering more than this share of it


@dataclass(frozen=True)
class AnnotatedRegion:
    """One region an annotator drew: its label and its (H, W) boolean mask at the image's size."""

    label: str
    mask: np.ndarray


def cell_coverage(mask: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) share of each cell that the (H, W) boolean ``mask`` covers, in [0, 1]."""
    return cv2.resize(mask.astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA)


def taught_examples(encoding: Encoding, regions: Sequence[AnnotatedRegion],
                    ignored: np.ndarray | None = None) -> Taught:
    """Per label, the prototypes of its regions and the features of the cells it mostly covers.

    ``ignored`` (H, W) marks pixels that teach nothing, not even ``UNLABELED``. No region: nothing.
    """
    if not regions:
        return {}
    channels, grid, _ = encoding.features.shape
    by_channel = encoding.features.reshape(channels, -1)  # (C, G*G): cast and multiplied as it lies, the fast way
    by_channel32 = by_channel.astype(np.float32)
    shape = (encoding.height, encoding.width)
    for region in regions:
        if region.mask.shape != shape:
            raise ValueError(f"region {region.label!r} is {region.mask.shape}, the image {shape}")
    covered = np.zeros(shape, bool)
    by_label: dict[str, list[np.ndarray]] = {}
    for region in regions:
        covered |= region.mask
        by_label.setdefault(region.label, []).append(region.mask)
    uncovered = ~covered if ignored is None else ~covered & ~ignored
    if uncovered.any():
        by_label.setdefault(UNLABELED, []).append(uncovered)
    taught = {}
    for label, masks in by_label.items():
        coverages = [cell_coverage(mask, grid).ravel() for mask in masks if mask.any()]
        if not coverages:
            continue
        prototypes = np.stack([by_channel32 @ coverage / coverage.sum() for coverage in coverages])
        majority = cell_coverage(np.logical_or.reduce(masks), grid).ravel() > MAJORITY
        taught[label] = LabelExamples(prototypes.astype(np.float16),
                                      by_channel.T[majority].astype(np.float16, copy=False))
    return taught


def teach(memory: Memory, annotation_id: str, encoding: Encoding, regions: Sequence[AnnotatedRegion],
          ignored: np.ndarray | None = None) -> None:
    """Replace what ``annotation_id`` taught ``memory`` by what ``regions`` show on ``encoding``."""
    if encoding.fingerprint != memory.fingerprint:
        raise ValueError(f"encoding made by other models ({encoding.fingerprint} != {memory.fingerprint})")
    memory.learn(annotation_id, taught_examples(encoding, regions, ignored))
