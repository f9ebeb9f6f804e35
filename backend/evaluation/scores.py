"""Semantic segmentation scores from one confusion matrix over a whole dataset.

The standard figure (mmsegmentation's ``mIoU``, the one papers compare) is computed from a single
confusion matrix summed over all images: IoU of a class = TP / (TP + FP + FN), averaged over the
classes whose union (ground truth or prediction) is non-empty. Pixels whose ground truth is
``IGNORE_INDEX`` (Pascal VOC's void border, COCO's unlabeled pixels) count nowhere, whatever the
prediction says there. The FreeSeg-Diff authors' released code averaged per-image mIoUs instead;
that averaging is kept as ``miou_per_image_mean`` so the two are never confused (with 255 still
ignored: the released code counted VOC's void border as background, which is not reproduced).
``ReleasePerImageMean`` is the released code's own per-image figure, its conventions and all, for
checking the paper's numbers: each image's mean is over the classes of its ground truth only, and
VOC's void border is background.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Pixel counts of (true class, predicted class), accumulated image by image.

    ``matrix[t, p]`` is the number of non-ignored pixels of true class ``t`` predicted as ``p``.
    Scores are percentages; a class with an empty union has no IoU (``None``) and is left out of
    the means rather than counted as 0 or 100.
    """

    def __init__(self, num_classes: int) -> None:
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be 1..{IGNORE_INDEX} (the ignore label), got {num_classes}")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.num_images = 0
        self._image_mious: list[float] = []

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        """Add one image: (H, W) integer label maps of the same shape; truth 255 is ignored."""
        image_matrix = self._count(prediction, truth)
        self.matrix += image_matrix
        self.num_images += 1
        image_iou = _iou(image_matrix)
        # An image whose pixels are all ignored has no mIoU of its own; it adds nothing either way.
        if not np.isnan(image_iou).all():
            self._image_mious.append(float(np.nanmean(image_iou)))

    def iou_per_class(self) -> list[float | None]:
        """IoU of each class in percent, ``None`` where neither truth nor prediction has the class."""
        return [None if np.isnan(value) else 100.0 * float(value) for value in _iou(self.matrix)]

    def miou(self) -> float:
        """Dataset-level mean IoU in percent, over the classes with a non-empty union."""
        self._require_pixels()
        return 100.0 * float(np.nanmean(_iou(self.matrix)))

    def pixel_accuracy(self) -> float:
        """Correctly labelled pixels over non-ignored pixels, in percent."""
        self._require_pixels()
        return 100.0 * float(np.trace(self.matrix)) / float(self.matrix.sum())

    def miou_per_image_mean(self) -> float:
        """Mean over images of each image's own mIoU (the authors' released figure), in percent.

        An image's mIoU averages the classes present in that image's truth or prediction.
        """
        self._require_pixels()
        return 100.0 * float(np.mean(self._image_mious))

    def _count(self, prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
        _check_maps(prediction, truth)
        _check_range(prediction, self.num_classes, "prediction")
        kept = truth != IGNORE_INDEX
        true_kept = truth[kept].astype(np.int64)
        _check_range(true_kept, self.num_classes, f"ground truth (besides {IGNORE_INDEX})")
        pairs = true_kept * self.num_classes + prediction[kept].astype(np.int64)
        counts = np.bincount(pairs, minlength=self.num_classes**2)
        return counts.reshape(self.num_classes, self.num_classes)

    def _require_pixels(self) -> None:
        if self.matrix.sum() == 0:
            raise ValueError("nothing to score: no image with a non-ignored pixel was added")


class ReleasePerImageMean:
    """The mean over images of each image's mIoU as the authors' released code computed it, in percent.

    An image's mIoU averages the classes present in its ground truth: a class only predicted adds
    no IoU of 0 of its own (its pixels still lower the IoU of the true class they cover). With
    ``void_as_background`` (VOC, as the released code read its label PNGs) ``IGNORE_INDEX`` in the
    truth is class 0; otherwise it is ignored.
    """

    def __init__(self, num_classes: int, void_as_background: bool = False) -> None:
        self.num_classes, self.void_as_background = num_classes, void_as_background
        self._image_mious: list[float] = []

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        if self.void_as_background:
            truth = np.where(truth == IGNORE_INDEX, 0, truth).astype(truth.dtype)
        image = ConfusionMatrix(self.num_classes)
        image.update(prediction, truth)
        present = image.matrix.sum(axis=1) > 0
        if present.any():
            self._image_mious.append(float(np.mean(_iou(image.matrix)[present])))

    def value(self) -> float:
        if not self._image_mious:
            raise ValueError("nothing to score: no image with a non-ignored pixel was added")
        return 100.0 * float(np.mean(self._image_mious))


def _iou(matrix: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN) per class as fractions; NaN where the union is empty."""
    true_positives = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - true_positives
    return np.where(union > 0, true_positives / np.maximum(union, 1), np.nan)


def _check_maps(prediction: np.ndarray, truth: np.ndarray) -> None:
    """Refuse shapes that differ: a silent resize would score a different segmentation."""
    if prediction.shape != truth.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from ground truth shape {truth.shape}; "
            "predict at the ground truth's size"
        )
    if truth.ndim != 2:
        raise ValueError(f"label maps must be 2-D (H, W), got shape {truth.shape}")
    for name, array in (("prediction", prediction), ("ground truth", truth)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must hold integer labels, got dtype {array.dtype}")


def _check_range(labels: np.ndarray, num_classes: int, name: str) -> None:
    """A label outside 0..num_classes-1 means the label list and the class list disagree."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds label {bad}, outside the {num_classes} classes 0..{num_classes - 1}")
