"""Score a dataset: from saved label-index PNGs, or by running a segmentation function.

Predictions use the format ``freesegdiff segment`` writes: 0 unlabeled, ``i`` the ``i``-th label
of the dataset's label list (``Dataset.label_names``), which is class ``i`` of the dataset, with
unlabeled scored as background (class 0). Both entry points return the same JSON-ready dict, with
both conventions: the dataset-level ``miou`` (mmsegmentation's) and ``miou_per_image_release``, the
per-image mean the authors' released code printed (``metrics.ReleasePerImageMean``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend.evaluation.datasets import Dataset, dataset_at
from backend.evaluation.scores import IGNORE_INDEX, ConfusionMatrix, ReleasePerImageMean
from backend.images import read_image_file

# (RGB image array, label names) -> (H, W) label map: 0 unlabeled, i the i-th label name.
Segment = Callable[[np.ndarray, list[str]], np.ndarray]

_LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")


def evaluate_predictions(dataset: str, root: Path, predictions: Path, limit: int | None = None) -> dict[str, Any]:
    """Score ``predictions/<id>.png`` against the ground truth, without any model."""
    spec = dataset_at(dataset, root)
    scores = _Scores.of(spec)
    for sample in spec.samples(root, limit):
        scores.add(sample.image_id, _read_prediction(Path(predictions), sample.image_id), sample.label)
    return scores.result()


def evaluate_with_model(dataset: str, root: Path, limit: int | None, segment: Segment) -> dict[str, Any]:
    """Segment each image with ``segment`` (given the dataset's label names) and score it."""
    spec = dataset_at(dataset, root)
    scores = _Scores.of(spec)
    for sample in spec.samples(root, limit):
        scores.add(sample.image_id, np.asarray(segment(read_image_file(sample.image_path), spec.label_names)),
                   sample.label)
    return scores.result()


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


@dataclass
class _Scores:
    """Both conventions over one pass: the dataset-level matrix and the released code's per-image mean."""

    spec: Dataset
    matrix: ConfusionMatrix
    release: ReleasePerImageMean

    @classmethod
    def of(cls, spec: Dataset) -> _Scores:
        return cls(spec, ConfusionMatrix(spec.num_classes),
                   ReleasePerImageMean(spec.num_classes, spec.release_void_as_background))

    def add(self, image_id: str, prediction: np.ndarray, truth: np.ndarray) -> None:
        """Add one image; a refused prediction's error names the image."""
        try:
            self.matrix.update(prediction, truth)
            self.release.update(prediction, truth)
        except ValueError as exc:
            raise ValueError(f"image {image_id}: {exc}") from exc

    def result(self) -> dict[str, Any]:
        return {
            "dataset": self.spec.key,
            "num_images": self.matrix.num_images,
            "num_classes": self.spec.num_classes,
            "ignore_index": IGNORE_INDEX,
            "miou": self.matrix.miou(),
            "pixel_accuracy": self.matrix.pixel_accuracy(),
            "miou_per_image_mean": self.matrix.miou_per_image_mean(),
            "miou_per_image_release": self.release.value(),
            "per_class_iou": dict(zip(self.spec.class_names, self.matrix.iou_per_class())),
        }
