"""The replay harness: what learning from corrections would do on an already labelled sample.

It walks the images one by one: predict with the memory of the images taught before, then
"correct" with the ground truth and learn it. Two orders: the dataset's, or lowest confidence
first (every image not yet taught is predicted again with the memory after each image taught,
and the least sure is taught next: Label Studio's tasks sorted by prediction score). With a
held-out set (the last N images in the dataset's order) the rest is the pool the walk teaches,
and at 0, 1, 2, 4, 8, ... images taught the held-out images are scored, with that memory and
without any, side by side; without one, the images not yet taught are. Each checkpoint also
gives the rank correlation (Spearman) of each scored image's confidence with its own mIoU: is a
low score a worse prediction? Per label, it notes how many images had been taught when the walk
first predicted the label correctly (IoU at least ``CORRECT_IOU`` on an image that shows it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.stats import spearmanr

from backend.evaluation.datasets import Dataset, Sample, dataset_at
from backend.evaluation.scores import IGNORE_INDEX, ConfusionMatrix
from backend.images import read_image_file
from backend.pipeline.exemplars import Exemplars
from backend.pipeline.memory import Memory, MemoryBounds
from backend.options import SegmentOptions
from backend.pipeline.segmenter import Segmentation, Segmenter
from backend.pipeline.teaching import AnnotatedRegion, teach
from backend.pipeline.vocabulary import labels_from_names

CORRECT_IOU = 0.5
Order = Literal["dataset", "confidence"]
ORDERS: tuple[Order, ...] = ("dataset", "confidence")


@dataclass(frozen=True)
class Checkpoint:
    """After ``taught`` images: mIoU (%) of the images scored without and with learning, and their confidence.

    ``rank_correlation``: Spearman's of per-image confidence and per-image mIoU, with learning (None
    when fewer than three images, or either is constant).
    """

    taught: int
    images_scored: int
    miou_without: float
    miou_with: float
    mean_confidence: float
    rank_correlation: float | None


@dataclass(frozen=True)
class ReplayResult:
    order: Order
    holdout: int
    taught_order: list[str]  # the image ids in the order the walk taught them
    checkpoints: list[Checkpoint]
    rank_correlation: float | None  # over every scored image of every checkpoint
    # label -> images taught before the walk first predicted it correctly (None: never)
    first_correct_with: dict[str, int | None]
    first_correct_without: dict[str, int | None]

    def to_dict(self) -> dict:
        return {"order": self.order, "holdout": self.holdout, "taught_order": self.taught_order,
                "checkpoints": [c.__dict__ for c in self.checkpoints], "rank_correlation": self.rank_correlation,
                "first_correct_with_learning": self.first_correct_with,
                "first_correct_without_learning": self.first_correct_without}


def checkpoints(count: int) -> list[int]:
    """0, 1, 2, 4, 8, ... below ``count``: the numbers of images taught at which the rest is scored."""
    points, taught = [0], 1
    while taught < count:
        points.append(taught)
        taught *= 2
    return [point for point in points if point < count]


def ground_truth_regions(truth: np.ndarray, names: Sequence[str]) -> tuple[list[AnnotatedRegion], np.ndarray]:
    """The "correction": one region per class present (class i is ``names[i - 1]``), and the ignored pixels."""
    regions = [AnnotatedRegion(names[value - 1], truth == value) for value in np.unique(truth)
               if 0 < value != IGNORE_INDEX]
    return regions, truth == IGNORE_INDEX


def replay(segmenter: Segmenter, spec: Dataset, samples: Sequence[Sample], options: SegmentOptions,
           bounds: MemoryBounds, order: Order = "dataset", holdout: int = 0, batch: int = 4) -> ReplayResult:
    """Walk the pool of ``samples`` in ``order``: predict, correct with the ground truth, learn (see the module)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    if not 0 <= holdout < len(samples):
        raise ValueError(f"holdout must leave images to teach: 0 <= N < {len(samples)} images, not {holdout}")
    labels = labels_from_names(spec.label_names)
    images = [read_image_file(sample.image_path) for sample in samples]
    encodings = segmenter.encode_many(images, batch)
    truths = [sample.label for sample in samples]

    def predict(index: int, exemplars: Exemplars | None) -> Segmentation:
        return segmenter.segment(encodings[index], images[index], labels, options, exemplars)

    baseline = [predict(index, None) for index in range(len(samples))]
    memory = Memory(segmenter.fingerprint, encodings[0].features.shape[0], bounds)
    held, remaining = list(range(len(samples) - holdout, len(samples))), list(range(len(samples) - holdout))
    points = checkpoints(len(remaining) + 1 if holdout else len(remaining))
    results, walked, scored_pairs = [], [], []
    for taught in range(len(remaining) + 1):
        exemplars = Exemplars.from_memory(memory) if memory.annotations else None
        predicted: dict[int, Segmentation] = {}
        if taught in points:
            scored = held or remaining
            predicted |= {index: predict(index, exemplars) for index in scored}
            pairs = [(predicted[index].score, _miou(spec, [predicted[index].label_map], [truths[index]]))
                     for index in scored]  # each image's own mIoU
            scored_pairs += pairs
            results.append(Checkpoint(
                taught, len(scored), _miou(spec, [baseline[i].label_map for i in scored], [truths[i] for i in scored]),
                _miou(spec, [predicted[i].label_map for i in scored], [truths[i] for i in scored]),
                float(np.mean([confidence for confidence, _ in pairs])), _spearman(pairs)))
        if not remaining:
            break
        if order == "confidence":
            predicted |= {index: predict(index, exemplars) for index in remaining if index not in predicted}
            chosen = min(remaining, key=lambda index: (predicted[index].score, index))
        else:
            chosen = remaining[0]
        remaining.remove(chosen)
        walked.append((chosen, predicted.get(chosen) or predict(chosen, exemplars)))
        regions, ignored = ground_truth_regions(truths[chosen], spec.label_names)
        teach(memory, samples[chosen].image_id, encodings[chosen], regions, ignored)
    walk_truths = [truths[index] for index, _ in walked]
    return ReplayResult(
        order, holdout, [samples[index].image_id for index, _ in walked], results, _spearman(scored_pairs),
        _first_correct(spec, [segmentation.label_map for _, segmentation in walked], walk_truths),
        _first_correct(spec, [baseline[index].label_map for index, _ in walked], walk_truths))


def replay_dataset(segmenter: Segmenter, dataset: str, root: Path, limit: int | None, options: SegmentOptions,
                   bounds: MemoryBounds, order: Order = "dataset", holdout: int = 0) -> ReplayResult:
    spec = dataset_at(dataset, root)
    return replay(segmenter, spec, list(spec.samples(root, limit)), options, bounds, order, holdout)


def _spearman(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Spearman's rank correlation of (confidence, mIoU) pairs; None when it is undefined."""
    if len(pairs) < 3:
        return None
    confidences, mious = zip(*pairs)
    if len(set(confidences)) < 2 or len(set(mious)) < 2:
        return None
    return float(spearmanr(confidences, mious).statistic)


def _miou(spec: Dataset, predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> float:
    matrix = ConfusionMatrix(spec.num_classes)
    for prediction, truth in zip(predictions, truths):
        matrix.update(prediction, truth)
    return matrix.miou()


def _first_correct(spec: Dataset, predictions: Sequence[np.ndarray],
                   truths: Sequence[np.ndarray]) -> dict[str, int | None]:
    first: dict[str, int | None] = {name: None for name in spec.class_names[1:]}
    for index, (prediction, truth) in enumerate(zip(predictions, truths)):
        for value, name in enumerate(spec.class_names[1:], start=1):
            shown, predicted = truth == value, prediction == value
            if first[name] is None and shown.any() and (shown & predicted).sum() >= CORRECT_IOU * (shown | predicted).sum():
                first[name] = index
    return first


def format_replay(result: ReplayResult) -> str:
    """The harness's two tables, fixed width, for a terminal."""
    scored = f"the last {result.holdout} images, held out" if result.holdout else "the images not yet taught"
    lines = [f"order {result.order}; scored: {scored}; rank correlation of confidence and mIoU over all: "
             f"{_correlation(result.rank_correlation)}",
             "taught  scored  mIoU without  mIoU with learning  mean confidence  rank correlation"]
    lines += [f"{c.taught:>6}  {c.images_scored:>6}  {c.miou_without:>12.2f}  {c.miou_with:>18.2f}  "
              f"{c.mean_confidence:>15.3f}  {_correlation(c.rank_correlation):>16}" for c in result.checkpoints]
    width = max(len(name) for name in result.first_correct_with) if result.first_correct_with else 5
    lines += ["", f"{'label':<{width}}  first correct after N images taught: with learning / without"]
    for name, taught in result.first_correct_with.items():
        without = result.first_correct_without[name]
        lines.append(f"{name:<{width}}  {_never(taught):>6} / {_never(without)}")
    return "\n".join(lines)


def _never(taught: int | None) -> str:
    return "never" if taught is None else str(taught)


def _correlation(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"
