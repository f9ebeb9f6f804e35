"""/predict's work: task images in, one Label Studio prediction per task out, in order.

Images are fetched and decoded in the request's thread pool; their encodings come from
the feature cache when it has them (a re-prompt: another label set, K, a click, typed
words) and are otherwise computed on the single inference worker, batched across
requests. The worker proposes the segmentations (clusters and their labels) and starts
their refinement; waiting for it (the CRF runs in a pool of processes) and building the
results (RLE encoding) happen back in the thread pool, so the inference thread goes on
with the next request meanwhile. A task whose image fails gets an empty prediction; its
error is logged and counted, and the other tasks go on.

The tasks go through all that ``FREESEG_MAX_BATCH`` at a time, one batch after another, so that
a request's work can stop between them (``RequestBound``): a request of many tasks holds the
worker for one batch at a time, never for all of its tasks at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from backend.net.fetch import ImageFetchError
from backend.images import ImageError
from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.config import ProjectVocabulary
from backend.labelstudio.task_images import DownloadBudget, TaskImageLoader
from backend.exports.brush_results import prediction, project_prediction
from backend.storage.cached_encoder import BatchEncode, CachedEncoder
from backend.storage.feature_cache import FeatureCache
from backend.labelstudio.interaction import Interaction
from backend.labelstudio.project_context import ProjectContext
from backend.pipeline.coordinates import PERCENT, to_frame
from backend.pipeline.encoding import Encoding
from backend.pipeline.exemplars import Exemplars
from backend.options import SegmentOptions
from backend.pipeline.segmenter import Click, Proposal, Segmentation, Segmenter
from backend.server.cache_writer import CacheWriter
from backend.server.prometheus import Metrics
from backend.server.protocol import Task
from backend.server.request_bound import RequestBound
from backend.server.inference import InferenceWorker, Priority
from backend.settings import Settings

log = logging.getLogger(__name__)


def _pixel_clicks(interaction: Interaction, image: np.ndarray) -> list[Click]:
    height, width = image.shape[:2]
    return [Click(*to_frame(c.x, c.y, PERCENT, (width, height)), c.label) for c in interaction.clicks]


@dataclass(frozen=True)
class _Loaded:
    image: np.ndarray
    data: bytes  # the image file's, which key its encoding in the feature cache


class Predictor:
    def __init__(self, settings: Settings, worker: InferenceWorker, metrics: Metrics, cache: FeatureCache,
                 cache_writer: CacheWriter):
        self.worker, self.metrics = worker, metrics
        self.cache, self.cache_writer = cache, cache_writer
        self.encoder = self._encoder(lambda images: worker.submit_encode(images).result())  # behind queued work
        self.images = TaskImageLoader.from_settings(settings)
        self.batch_size = settings.max_batch  # tasks per step: the worker's batch, and what a stop may let finish

    async def predict(self, tasks: Sequence[Task], context: ProjectContext, bound: RequestBound,
                      interaction: Interaction | None = None) -> list[dict]:
        """One prediction per task, made and labelled as the project's ``context`` says.

        Raises what ``bound`` raises when the client goes or the deadline passes: no later batch is started.
        """
        self.worker.ensure_accepting()  # before any download: a busy answer should be cheap
        with self.worker.requests.serving():  # background runs wait meanwhile
            return await self._predict(tasks, context, bound, interaction)

    async def _predict(self, tasks: Sequence[Task], context: ProjectContext, bound: RequestBound,
                       interaction: Interaction | None) -> list[dict]:
        vocabulary, options, access = context.vocabulary, context.options, context.access
        budget = self.images.budget()  # shared by the request's downloads: N images are not N timeouts
        predictions: list[dict] = []
        building = 0.0
        priority = Priority.INTERACTIVE if interaction is not None or len(tasks) == 1 else Priority.MULTI
        for first in range(0, len(tasks), self.batch_size):
            loaded = await run_in_threadpool(self._load_images, tasks[first : first + self.batch_size], vocabulary,
                                             access, bound, budget)
            present = [item for item in loaded if item is not None]
            segmentations = (await self._segment(present, vocabulary, options, bound, interaction, context.exemplars,
                                                 priority) if present else [])
            start = time.perf_counter()
            predictions += await run_in_threadpool(self._predictions, loaded, segmentations, vocabulary,
                                                   context.model_version)
            building += time.perf_counter() - start
        self.metrics.observe_stage("results", building)
        return predictions

    def _predictions(self, loaded: list[_Loaded | None], segmentations: list[Segmentation],
                     vocabulary: ProjectVocabulary, version: str) -> list[dict]:
        """In the tasks' order: an empty prediction for each task whose image failed."""
        found = iter(segmentations)
        return [self._prediction(next(found), vocabulary, version) if item is not None
                else prediction([], 0.0, version) for item in loaded]

    def _load_images(self, tasks: Sequence[Task], vocabulary: ProjectVocabulary, access: LabelStudioAccess,
                     bound: RequestBound, budget: DownloadBudget) -> list[_Loaded | None]:
        """In series, each download only while the request is still wanted and within its budget."""
        loaded = []
        for task in tasks:
            bound.check()
            loaded.append(self._load_image(task, vocabulary, access, budget))
        return loaded

    def _load_image(self, task: Task, vocabulary: ProjectVocabulary, access: LabelStudioAccess,
                    budget: DownloadBudget) -> _Loaded | None:
        try:
            image = self.images.load(task.model_dump(), vocabulary.image_key, access, budget)
            return _Loaded(image.pixels, image.data)
        except (ImageFetchError, ImageError) as error:
            kind = f"image_{error.kind}" if isinstance(error, ImageFetchError) else "image_decode"
            log.warning("task %s: no prediction, its image failed: %s", task.id, error)
            self.metrics.errors.labels(kind=kind).inc()
            self.metrics.tasks.labels(outcome="failed").inc()
            return None

    async def _segment(
        self, items: list[_Loaded], vocabulary: ProjectVocabulary, options: SegmentOptions, bound: RequestBound,
        interaction: Interaction | None, exemplars: Exemplars | None = None, priority: Priority = Priority.MULTI,
    ) -> list[Segmentation]:
        """Segment every image on the inference worker, encoding only those not in the cache."""
        loop = asyncio.get_running_loop()

        def encode(images: list[np.ndarray]) -> list[Encoding]:  # the worker's, waited on within the request's bound
            return asyncio.run_coroutine_threadsafe(bound.wait(self.worker.submit_encode(images, priority)), loop).result()

        encoded = await run_in_threadpool(self._encoder(encode).encode_batch,
                                          [(item.data, item.image) for item in items])
        encodings = encoded.encodings
        if interaction is not None and interaction.text:
            options = dataclasses.replace(options, prompt=interaction.text)
        labels = vocabulary.labels

        def propose(segmenter: Segmenter) -> list[Proposal]:
            if interaction is not None and interaction.clicks:
                return [segmenter.propose_clicks(e, item.image, labels, _pixel_clicks(interaction, item.image), options)
                        for e, item in zip(encodings, items)]
            return segmenter.propose_batch(encodings, [item.image for item in items], labels, options, exemplars)

        proposals = await bound.wait(self.worker.submit(propose, priority))
        segmentations = await run_in_threadpool(lambda: [p.finish() for p in proposals])  # no model needed
        log.info("segmented %d images, %d from the feature cache%s", len(items), len(items) - encoded.computed,
                 " (interactive)" if interaction else "")
        return segmentations

    def _encoder(self, encode: BatchEncode) -> CachedEncoder:
        """``encode`` (the inference worker's, batched across requests) behind the feature cache; new encodings
        are written by the cache writer, off the request's path."""
        return CachedEncoder(self.cache, self.worker, encode, self.cache_writer.put)

    def _prediction(self, segmentation: Segmentation, vocabulary: ProjectVocabulary, model_version: str) -> dict:
        self.metrics.tasks.labels(outcome="predicted").inc()
        return project_prediction(segmentation, vocabulary, model_version)
