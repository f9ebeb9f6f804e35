"""COCO instances: the dataset format of most segmentation trainers (and of Label Studio's exporter).

``coco_annotations`` turns a segmentation into one annotation per labelled region, with an
uncompressed RLE mask; ``annotate-folder`` numbers them and writes ``coco.json``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from backend.pipeline.segmenter import Segmentation, map_value
from backend.pipeline.vocabulary import Label


def coco_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a boolean (H, W) mask: column-major runs, zeros first."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return {"counts": [], "size": [int(mask.shape[0]), int(mask.shape[1])]}
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size])))
    counts = ([0] if flat[0] else []) + [int(r) for r in runs]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def mask_bbox(mask: np.ndarray) -> list[int]:
    """[x, y, width, height] of the mask's set pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    return [int(columns[0]), int(rows[0]), int(columns[-1] - columns[0] + 1), int(rows[-1] - rows[0] + 1)]


def category_id(label: int) -> int:
    """The COCO category of ``labels[label]``: its value in the label-index PNGs, so the two read alike."""
    return map_value(label)


def coco_categories(labels: Sequence[Label]) -> list[dict]:
    """``coco.json``'s categories: one per label, numbered as the label-index PNGs number them."""
    return [{"id": category_id(index), "name": label.name} for index, label in enumerate(labels)]


def coco_annotations(segmentation: Segmentation) -> list[dict]:
    """One COCO annotation per labelled region that still has pixels, without ``id`` and ``image_id`` yet."""
    annotations = []
    for region in segmentation.regions:
        mask = segmentation.region_mask(region)
        area = int(mask.sum())
        if area == 0:
            continue
        annotations.append({
            "category_id": category_id(region.label),
            "segmentation": coco_rle(mask),
            "area": area,
            "bbox": mask_bbox(mask),
            "iscrowd": 0,
            "score": round(region.score, 4),
        })
    return annotations
