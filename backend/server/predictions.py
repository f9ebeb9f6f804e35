"""/predict's work: task images in, one Label Studio prediction per task out, in order.

Images are fetched and decoded in the request's thread pool, inference runs on the
single inference worker as one batch per request, and the results (RLE encoding) are
built back in the thread pool, off the inference thread. A task whose image fails gets
an empty prediction; its error is logged and counted, and the other tasks go on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
from starlette.concurrency import run_in_threadpool

from backend.images import ImageError, ImageLimits, decode_image
from backend.labelstudio.config import ProjectVocabulary
from backend.labelstudio.images import ImageFetchError, LabelStudioAccess, fetch_image_bytes, task_image_url
from backend.labelstudio.results import brush_results, polygon_results, prediction
from backend.pipeline.segmenter import Segmentation, Segmenter, SegmentOptions
from backend.server.metrics import Metrics
from backend.server.protocol import Task
from backend.server.worker import InferenceWorker
from backend.settings import Settings

log = logging.getLogger(__name__)


def options_with(defaults: SegmentOptions, overrides: Mapping[str, str]) -> SegmentOptions:
    """``defaults`` changed by validated option strings (``{"k": "5", "use_caption": "false"}``)."""
    typed: dict[str, object] = {}
    for key, value in overrides.items():
        typed[key] = int(value) if key == "k" else value == "true" if key in ("use_caption", "caption_fallback") else value
    return dataclasses.replace(defaults, **typed)


class Predictor:
    def __init__(self, settings: Settings, worker: InferenceWorker, metrics: Metrics, model_version: str):
        self.settings, self.worker, self.metrics = settings, worker, metrics
        self.model_version = model_version
        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)

    async def predict(
        self, tasks: Sequence[Task], vocabulary: ProjectVocabulary, options: SegmentOptions, access: LabelStudioAccess
    ) -> list[dict]:
        self.worker.ensure_ready()  # before any download: a busy answer should be cheap
        images = await run_in_threadpool(self._load_images, tasks, vocabulary, access)
        loaded = [image for image in images if image is not None]
        segmentations = iter(await self._segment(loaded, vocabulary, options) if loaded else [])
        start = time.perf_counter()
        predictions = await run_in_threadpool(
            lambda: [self._prediction(next(segmentations), vocabulary) if image is not None else self._empty()
                     for image in images]
        )
        self.metrics.observe_stage("results", time.perf_counter() - start)
        return predictions

    def _load_images(
        self, tasks: Sequence[Task], vocabulary: ProjectVocabulary, access: LabelStudioAccess
    ) -> list[np.ndarray | None]:
        return [self._load_image(task, vocabulary, access) for task in tasks]

    def _load_image(self, task: Task, vocabulary: ProjectVocabulary, access: LabelStudioAccess) -> np.ndarray | None:
        try:
            url = task_image_url(task.model_dump(), vocabulary.image_key)
            data = fetch_image_bytes(url, task.id, access, self.limits, timeout=self.settings.fetch_timeout)
            return decode_image(data, self.limits)
        except (ImageFetchError, ImageError) as error:
            kind = f"image_{error.kind}" if isinstance(error, ImageFetchError) else "image_decode"
            log.warning("task %s: no prediction, its image failed: %s", task.id, error)
            self.metrics.errors.labels(kind=kind).inc()
            self.metrics.tasks.labels(outcome="failed").inc()
            return None

    async def _segment(
        self, images: list[np.ndarray], vocabulary: ProjectVocabulary, options: SegmentOptions
    ) -> list[Segmentation]:
        def work(segmenter: Segmenter) -> list[Segmentation]:
            encodings = segmenter.encode_batch(images)
            return [segmenter.segment(e, image, vocabulary.labels, options) for e, image in zip(encodings, images)]

        return await asyncio.wrap_future(self.worker.submit(work))

    def _prediction(self, segmentation: Segmentation, vocabulary: ProjectVocabulary) -> dict:
        to_results = polygon_results if vocabulary.result_type == "polygonlabels" else brush_results
        results = to_results(segmentation, vocabulary.from_name, vocabulary.to_name)
        self.metrics.tasks.labels(outcome="predicted").inc()
        return prediction(results, segmentation.score, self.model_version)

    def _empty(self) -> dict:
        return prediction([], 0.0, self.model_version)
