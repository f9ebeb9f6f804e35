"""Score a dataset: from saved label-index PNGs, or by running a segmentation function.

Predictions use the format ``freesegdiff segment`` writes: 0 unlabeled, ``i`` the ``i``-th label
of the dataset's label list (``Dataset.label_names``), which is class ``i`` of the dataset, with
unlabeled scored as background (class 0). Both entry points return the same JSON-ready dict.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend.evaluation.datasets import Dataset, dataset_at
from backend.evaluation.metrics import IGNORE_INDEX, ConfusionMatrix
from backend.images import read_image_file

# (RGB image array, label names) -> (H, W) label map: 0 unlabeled, i the i-th label name.
Segment = Callable[[np.ndarray, list[str]], np.ndarray]

_LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")


def evaluate_predictions(dataset: str, root: Path, predictions: Path, limit: int | None = None) -> dict[str, Any]:
    """Score ``predictions/<id>.png`` against the ground truth, without any model."""
    spec = dataset_at(dataset, root)
    matrix = ConfusionMatrix(spec.num_classes)
    for sample in spec.samples(root, limit):
        _add(matrix, sample.image_id, _read_prediction(Path(predictions), sample.image_id), sample.label)
    return _result(spec, matrix)


def evaluate_with_model(dataset: str, root: Path, limit: int | None, segment: Segment) -> dict[str, Any]:
    """Segment each image with ``segment`` (given the dataset's label names) and score it."""
    spec = dataset_at(dataset, root)
    matrix = ConfusionMatrix(spec.num_classes)
    for sample in spec.samples(root, limit):
        prediction = np.asarray(segment(read_image_file(sample.image_path), spec.label_names))
        _add(matrix, sample.image_id, prediction, sample.label)
    return _result(spec, matrix)


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write a result as strict JSON (classes without an IoU are null, never NaN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")


def _read_prediction(folder: Path, image_id: str) -> np.ndarray:
    path = folder / f"{image_id}.png"
    if not path.is_file():
        raise FileNotFoundError(f"no prediction for image {image_id}: {path} is missing")
    with Image.open(path) as image:
        if image.mode not in _LABEL_MODES:
            raise ValueError(f"prediction {path} must be a single-channel label PNG, got mode {image.mode}")
        return np.array(image)


def _add(matrix: ConfusionMatrix, image_id: str, prediction: np.ndarray, truth: np.ndarray) -> None:
    """Add one image; a refused prediction's error names the image."""
    try:
        matrix.update(prediction, truth)
    except ValueError as exc:
        raise ValueError(f"image {image_id}: {exc}") from exc


def _result(spec: Dataset, matrix: ConfusionMatrix) -> dict[str, Any]:
    return {
        "dataset": spec.key,
        "num_images": matrix.num_images,
        "num_classes": spec.num_classes,
        "ignore_index": IGNORE_INDEX,
        "miou": matrix.miou(),
        "pixel_accuracy": matrix.pixel_accuracy(),
        "miou_per_image_mean": matrix.miou_per_image_mean(),
        "per_class_iou": dict(zip(spec.class_names, matrix.iou_per_class())),
    }
