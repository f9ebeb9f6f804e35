"""Feedback from annotators' corrections: how good was the pre-annotation, per label?

When an annotation is created or updated on a task that carries this backend's
prediction, the two are compared region by region (``backend.labelstudio.corrections``), the
outcome is stored (Redis when configured, else a file under MODEL_DIR) and counted on
``/metrics``. ``freesegdiff report --project ID`` reads the store back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from backend.labelstudio.corrections import compare
from backend.storage.feedback_log import FeedbackRecord, FeedbackStore
from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.backoff import LABEL_STUDIO_ERRORS, Backoff, describe
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.projects import project_id
from backend.server.prometheus import Metrics

log = logging.getLogger(__name__)
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")


class FeedbackRecorder:
    """Records feedback in ``store``; brush regions over ``max_pixels`` (FREESEG_MAX_IMAGE_PIXELS) are refused."""

    def __init__(self, store: FeedbackStore, metrics: Metrics, backoff: Backoff, max_pixels: int):
        self.store, self.metrics, self.backoff, self.max_pixels = store, metrics, backoff, max_pixels

    def record(self, payload: Mapping[str, Any], access: LabelStudioAccess) -> FeedbackRecord | None:
        """Compare the annotation in a webhook ``payload`` with our prediction; None when there is none."""
        annotation = payload.get("annotation") or {}
        project = project_id(payload.get("project"))
        task_id = annotation.get("task") or (payload.get("task") or {}).get("id")
        if not task_id or not project:
            return None
        try:
            client = LabelStudioClient(access, self.backoff)
            prediction = client.our_prediction(int(task_id), annotation.get("parent_prediction"))
        except (ValueError, *LABEL_STUDIO_ERRORS) as error:
            log.warning("feedback for task %s skipped: %s", task_id, describe(error))
            self.metrics.errors.labels(kind="feedback_api").inc()
            return None
        if prediction is None:
            return None
        labels = compare(prediction.get("result") or [], annotation.get("result") or [], self.max_pixels)
        record = FeedbackRecord(project=project, task=int(task_id), timestamp=time.time(),
                                model_version=str(prediction.get("model_version", "")), labels=tuple(labels))
        self.store.add(record)
        for feedback in labels:
            self.metrics.feedback_iou.labels(label=feedback.label).observe(feedback.iou)
            self.metrics.feedback_regions.labels(label=feedback.label, outcome=feedback.outcome).inc()
        log.info("feedback for task %s: %s", task_id,
                 ", ".join(f"{f.label} {f.outcome} IoU {f.iou:.2f}" for f in labels) or "no brush regions")
        return record
