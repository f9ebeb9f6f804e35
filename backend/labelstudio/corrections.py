"""How good was the pre-annotation? Our brush prediction compared with the annotator's correction.

``compare`` turns one task's prediction and final annotation into one ``LabelFeedback`` per label:
the IoU of the predicted and annotated masks and what the annotator did with it (kept, edited,
deleted, added); the feedback log (``backend.storage.feedback_log``) keeps them as plain records,
and ``summarize`` aggregates records per label.

Only ``brushlabels`` results with RLE masks are compared; polygons and every other result type are
ignored, and so are brush regions without a label. Regions are matched by ``from_name`` and label:
all regions of one label under one ``from_name`` are OR-ed into one mask, so splitting or merging
regions is not an edit.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from backend.labelstudio.annotations import MAX_BRUSH_PIXELS, decode_brush
from backend.storage.feedback_log import ADDED, DELETED, EDITED, KEPT, FeedbackRecord, LabelFeedback

log = logging.getLogger(__name__)

# An IoU at least this high counts as accepted unchanged: brush round trips and a stray click
# in the editor move a pixel or two without the annotator meaning to change the region.
KEPT_IOU = 0.99

_Key = tuple[str, str]  # (from_name, label)


def compare(prediction_results: list[dict], annotation_results: list[dict],
            max_pixels: int = MAX_BRUSH_PIXELS) -> list[LabelFeedback]:
    """One ``LabelFeedback`` per label in the prediction or the annotation, by from_name then label.

    A brush region over ``max_pixels`` (FREESEG_MAX_IMAGE_PIXELS) raises ``BrushSizeError``.
    """
    predicted, annotated = _label_masks(prediction_results, max_pixels), _label_masks(annotation_results, max_pixels)
    return [_label_feedback(key, predicted.get(key), annotated.get(key))
            for key in sorted(predicted.keys() | annotated.keys())]


def iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks are identical (1.0)."""
    union = np.logical_or(first, second).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(first, second).sum() / union)


def _label_feedback(key: _Key, predicted: np.ndarray | None, annotated: np.ndarray | None) -> LabelFeedback:
    label = key[1]
    if annotated is None:
        return LabelFeedback(label, 0.0, DELETED)
    if predicted is None:
        return LabelFeedback(label, 0.0, ADDED)
    if predicted.shape != annotated.shape:
        log.warning("label %r of %r: predicted mask is %s, annotated %s; scored as IoU 0",
                    label, key[0], predicted.shape, annotated.shape)
        return LabelFeedback(label, 0.0, EDITED)
    score = iou(predicted, annotated)
    return LabelFeedback(label, score, KEPT if score >= KEPT_IOU else EDITED)


def _label_masks(results: list[dict], max_pixels: int) -> dict[_Key, np.ndarray]:
    """The OR of all brush regions per (from_name, label); undecodable regions are left out."""
    masks: dict[_Key, np.ndarray] = {}
    for result in results:
        if result.get("type") != "brushlabels":
            continue
        value = result.get("value")
        labels = (value.get("brushlabels") if isinstance(value, dict) else None) or []
        mask = decode_brush(result, max_pixels) if labels else None
        if mask is None:  # no label to credit, or an RLE that does not decode
            continue
        for label in labels:
            _merge(masks, (result.get("from_name", ""), label), mask)
    return masks


def _merge(masks: dict[_Key, np.ndarray], key: _Key, mask: np.ndarray) -> None:
    if key not in masks:
        masks[key] = mask.copy()
    elif masks[key].shape != mask.shape:
        log.warning("skipping a %s region of label %r of %r: its other regions are %s",
                    mask.shape, key[1], key[0], masks[key].shape)
    else:
        masks[key] |= mask


# --- summaries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSummary:
    """One label over many tasks; ``mean_iou`` counts deleted and added labels as IoU 0."""

    label: str
    count: int
    mean_iou: float
    kept: int
    edited: int
    deleted: int
    added: int


def summarize(records: Iterable[FeedbackRecord]) -> dict[str, LabelSummary]:
    """Per label, sorted by label: how often it was seen, its mean IoU and its outcomes."""
    by_label: dict[str, list[LabelFeedback]] = defaultdict(list)
    for record in records:
        for feedback in record.labels:
            by_label[feedback.label].append(feedback)
    return {label: _summary(label, by_label[label]) for label in sorted(by_label)}


def _summary(label: str, feedback: list[LabelFeedback]) -> LabelSummary:
    outcomes = [f.outcome for f in feedback]
    return LabelSummary(
        label=label,
        count=len(feedback),
        mean_iou=sum(f.iou for f in feedback) / len(feedback),
        kept=outcomes.count(KEPT),
        edited=outcomes.count(EDITED),
        deleted=outcomes.count(DELETED),
        added=outcomes.count(ADDED),
    )
