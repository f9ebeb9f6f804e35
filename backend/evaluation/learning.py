"""The replay harness: what learning from corrections would do on an already labelled sample.

It walks the images in a fixed order (the dataset's): predict with the memory of the images
before, then "correct" with the ground truth and learn it. At 0, 1, 2, 4, 8, ... images taught
it scores every image not yet taught, with that memory and without any, side by side (the same
images both ways). Per label, it notes how many images had been taught when the walk first
predicted the label correctly (IoU at least ``CORRECT_IOU`` on an image that shows it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.evaluation.datasets import Dataset, Sample, dataset_at
from backend.evaluation.metrics import IGNORE_INDEX, ConfusionMatrix
from backend.images import read_image_file
from backend.pipeline.encoding import Encoding
from backend.pipeline.exemplars import Exemplars
from backend.pipeline.memory import Memory, MemoryBounds
from backend.pipeline.segmenter import Segmenter, SegmentOptions
from backend.pipeline.teaching import AnnotatedRegion, teach
from backend.pipeline.vocabulary import labels_from_names

CORRECT_IOU = 0.5


@dataclass(frozen=True)
class Checkpoint:
    """mIoU (%) of the images not yet taught, after ``taught`` images, without and with learning."""

    taught: int
    images_scored: int
    miou_without: float
    miou_with: float


@dataclass(frozen=True)
class ReplayResult:
    checkpoints: list[Checkpoint]
    # label -> images taught before the walk first predicted it correctly (None: never)
    first_correct_with: dict[str, int | None]
    first_correct_without: dict[str, int | None]

    def to_dict(self) -> dict:
        return {"checkpoints": [c.__dict__ for c in self.checkpoints],
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
           bounds: MemoryBounds, batch: int = 4) -> ReplayResult:
    """Walk ``samples`` in order: predict, correct with the ground truth, learn (see the module's docstring)."""
    labels = labels_from_names(spec.label_names)
    images = [read_image_file(sample.image_path) for sample in samples]
    encodings = segmenter.encode_many(images, batch)
    baseline = [segmenter.segment(e, image, labels, options).label_map for e, image in zip(encodings, images)]
    memory = Memory(segmenter.fingerprint, encodings[0].features.shape[0], bounds) if encodings else None
    results, walked = [], []
    points = checkpoints(len(samples))
    for index, (sample, encoding, image) in enumerate(zip(samples, encodings, images)):
        exemplars = Exemplars.from_memory(memory) if memory.annotations else None
        if index in points:
            learned = [_predict(segmenter, e, im, labels, options, exemplars)
                       for e, im in zip(encodings[index:], images[index:])]
            truths = [s.label for s in samples[index:]]
            results.append(Checkpoint(index, len(truths), _miou(spec, baseline[index:], truths),
                                      _miou(spec, learned, truths)))
            walked.append(learned[0])
        else:
            walked.append(_predict(segmenter, encoding, image, labels, options, exemplars))
        regions, ignored = ground_truth_regions(sample.label, spec.label_names)
        teach(memory, sample.image_id, encoding, regions, ignored)
    truths = [sample.label for sample in samples]
    return ReplayResult(results, _first_correct(spec, walked, truths), _first_correct(spec, baseline, truths))


def replay_dataset(segmenter: Segmenter, dataset: str, root: Path, limit: int | None, options: SegmentOptions,
                   bounds: MemoryBounds) -> ReplayResult:
    spec = dataset_at(dataset, root)
    return replay(segmenter, spec, list(spec.samples(root, limit)), options, bounds)


def _predict(segmenter: Segmenter, encoding: Encoding, image: np.ndarray, labels, options: SegmentOptions,
             exemplars: Exemplars | None) -> np.ndarray:
    return segmenter.segment(encoding, image, labels, options, exemplars).label_map


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
    lines = ["taught  scored  mIoU without  mIoU with learning"]
    lines += [f"{c.taught:>6}  {c.images_scored:>6}  {c.miou_without:>12.2f}  {c.miou_with:>18.2f}"
              for c in result.checkpoints]
    width = max(len(name) for name in result.first_correct_with) if result.first_correct_with else 5
    lines += ["", f"{'label':<{width}}  first correct after N images taught: with learning / without"]
    for name, taught in result.first_correct_with.items():
        without = result.first_correct_without[name]
        lines.append(f"{name:<{width}}  {_never(taught):>6} / {_never(without)}")
    return "\n".join(lines)


def _never(taught: int | None) -> str:
    return "never" if taught is None else str(taught)
