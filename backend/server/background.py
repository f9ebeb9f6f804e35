"""/predict's way out of Label Studio's 100 s: tasks over the budget go to a background run.

A request whose estimate (``PredictBudget``) exceeds FREESEG_PREDICT_BUDGET_SECONDS is answered at once
with no results (Label Studio logs that it received none and stores nothing); its tasks go to a
background run (``backend.jobs.background_runs``: annotate-project's engine), which writes each
prediction through Label Studio's API with the request's project context. Without Label Studio access
(LABEL_STUDIO_URL and its key, else what /setup sent), or without task ids, it is answered as before.

Without REDIS_URL the run is this process's: a thread hands each batch to the inference worker at
background priority, behind every request (``WorkerSegmenter``: the worker's models, not a copy).
A local run whose server stopped (a restart, a crash) is taken up by a server with the same
``model_version`` once its models are ready: it goes on where it stopped, with the project's context as
/setup kept it (a queued run needs nobody: its chunks wait in Redis for the workers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import TypeVar

import numpy as np

from backend.jobs.background_runs import LocalRun, LocalRuns, active, cancel, current, described, start_queued
from backend.jobs.project import ProjectRun
from backend.labelstudio.backoff import Backoff
from backend.labelstudio.client import LabelStudioProject
from backend.labelstudio.interaction import Interaction
from backend.labelstudio.project_context import ProjectContext
from backend.labelstudio.projects import project_id
from backend.models.assembly import resolve_device
from backend.pipeline.exemplars import Exemplars
from backend.pipeline.encoding import Encoding
from backend.options import SegmentOptions
from backend.pipeline.segmenter import Segmentation
from backend.pipeline.vocabulary import Label
from backend.server.inference import InferenceWorker, ModelState, Priority, QueueFullError
from backend.server.predict_budget import PredictBudget
from backend.server.predictions import Predictor
from backend.server.prometheus import Metrics
from backend.server.protocol import Task
from backend.server.request_bound import RequestBound
from backend.settings import Settings
from backend.storage.backing import runs_redis_if_set
from backend.storage.cached_encoder import CachedEncoder
from backend.storage.feature_cache import FeatureCache
from backend.storage.run_registry import ACTIVE_STATES, RunRecord, RunRegistry
from backend.storage.shared_store import SharedStore

log = logging.getLogger(__name__)
Tag = TypeVar("Tag")
T = TypeVar("T")
FULL_QUEUE_WAIT_SECONDS = 0.5  # a background batch waits this long for room in a full inference queue
LOST_RUNS_LOOK_SECONDS = 5.0  # how often a server looks for local runs whose server stopped, to take them up


class WorkerSegmenter:
    """A background run's segmentation on the server's inference worker: each batch's encoding (through the
    server's feature cache) and proposal are jobs at background priority, behind every request; a batch is
    refined before the next one is proposed, so that at most one batch's refinement is ever queued in the CRF
    processes ahead of a request's. Each step (the downloads, a job, the refinement) waits until no request is
    being answered. ``observe`` gets each batch's size and seconds, download included."""

    def __init__(self, worker: InferenceWorker, observe: Callable[[int, float], None],
                 cache: FeatureCache | None = None, keep: Callable[[str, Encoding], None] | None = None) -> None:
        self.worker, self.observe = worker, observe
        self.encoder = CachedEncoder(cache, worker, lambda images: self._on_worker(
            lambda worker: worker.submit_encode(images, Priority.BACKGROUND)), keep)

    def segment_encoded(self, batches: Iterable[tuple[Tag, Sequence[Encoding], Sequence[np.ndarray]]],
                        labels: Sequence[Label], options: SegmentOptions, exemplars: Exemplars | None = None,
                        ) -> Iterator[tuple[Tag, list[Segmentation]]]:
        batches = iter(batches)
        while True:
            self.worker.requests.wait_until_none()
            start = time.perf_counter()
            batch = next(batches, None)  # the batch's images downloaded and encoded
            if batch is None:
                return
            tag, encodings, images = batch
            proposals = self._on_worker(lambda worker: worker.submit(
                lambda segmenter: segmenter.propose_batch(encodings, images, labels, options, exemplars),
                Priority.BACKGROUND))
            self.worker.requests.wait_until_none()
            segmentations = [proposal.finish() for proposal in proposals]
            self.observe(len(images), time.perf_counter() - start)
            yield tag, segmentations

    def _on_worker(self, submit: Callable[[InferenceWorker], Future[T]]) -> T:
        """``submit``'s job's result; while the worker's queue is full, requests first: wait for room."""
        while True:
            self.worker.requests.wait_until_none()
            try:
                return submit(self.worker).result()
            except QueueFullError:
                time.sleep(FULL_QUEUE_WAIT_SECONDS)


class Background:
    """The server's background runs: the budget decision, starting runs, listing and cancelling them."""

    def __init__(self, settings: Settings, worker: InferenceWorker, predictor: Predictor, shared: SharedStore,
                 metrics: Metrics, kept_context: Callable[[int], ProjectContext]) -> None:
        self.settings, self.worker, self.predictor = settings, worker, predictor
        self.kept_context = kept_context  # a project's context as /setup kept it: for the runs taken up
        self.budget = PredictBudget(settings.predict_budget_seconds, resolve_device(settings.device)[0].type,
                                    tiny_models=settings.models == "tiny")
        self.registry = RunRegistry(shared)
        self.local = LocalRuns(self.registry)
        self.connection = runs_redis_if_set(settings)
        metrics.background_runs.set_function(lambda: self._active_count()[0])
        metrics.background_tasks_left.set_function(lambda: self._active_count()[1])
        self._stopping = threading.Event()
        self._lost_runs = threading.Thread(target=self._take_up_lost_runs, name="background-lost-runs", daemon=True)

    def start(self) -> None:
        """Look for local runs whose server stopped, now and then, to take them up."""
        self._lost_runs.start()

    async def predict(self, project: object, tasks: Sequence[Task], context: ProjectContext, bound: RequestBound,
                      interaction: Interaction | None) -> list[dict]:
        """The request's predictions; none when its tasks went to a background run."""
        if self.budget.too_big(len(tasks), interaction is not None):
            if await asyncio.to_thread(self.hand_over, project, tasks, context):
                return []
        start = time.perf_counter()
        results = await self.predictor.predict(tasks, context, bound, interaction)
        self.budget.observe(len(tasks), time.perf_counter() - start)
        return results

    def hand_over(self, project: object, tasks: Sequence[Task], context: ProjectContext) -> bool:
        """Hand the tasks to a background run (or find them in one); False when they must be answered now."""
        why_not = self._why_not_background(project, tasks, context)
        if why_not:
            log.warning("/predict of %d tasks (about %.0f s, over FREESEG_PREDICT_BUDGET_SECONDS=%g) answered now: "
                        "%s", len(tasks), self.budget.estimate(len(tasks)), self.budget.budget_seconds, why_not)
            return False
        key = int(project_id(project))
        mode = "queued" if self.connection is not None else "local"
        record = self.registry.claim(key, context.model_version, [task.id for task in tasks], mode,
                                     lambda record: active(record, self.connection))
        if record is None:
            log.info("/predict of %d tasks of project %s: every one is in a background run already", len(tasks), key)
            return True
        log.info("background run %s: %d tasks of project %s (about %.0f s, over FREESEG_PREDICT_BUDGET_SECONDS=%g), "
                 "%s", record.id, record.total, key, self.budget.estimate(record.total), self.budget.budget_seconds,
                 "on the Redis queue" if mode == "queued" else "on this server's inference worker")
        if mode == "queued":
            start_queued(record, self._api(record, context), self.settings, self.registry)
        else:
            self._run_here(record, context)
        return True

    def _api(self, record: RunRecord, context: ProjectContext) -> LabelStudioProject:
        return LabelStudioProject(context.access, record.project, Backoff.from_settings(self.settings))

    def _run_here(self, record: RunRecord, context: ProjectContext) -> None:
        """The run on this server's inference worker, in a thread of its own."""
        run = ProjectRun(self._api(record, context), context, overwrite=False)
        segmenter = WorkerSegmenter(self.worker, self.budget.observe, self.predictor.cache,
                                    self.predictor.cache_writer.put)
        self.local.start(LocalRun(record, run, segmenter, segmenter.encoder, self.settings, self.registry))

    def _take_up_lost_runs(self) -> None:
        while not self._stopping.wait(LOST_RUNS_LOOK_SECONDS):
            if self.worker.state != ModelState.READY:
                continue
            try:
                self.take_up_lost_runs()
            except Exception as error:  # the store away: the next look tries again
                log.warning("looking for background runs to take up: %s", error)

    def take_up_lost_runs(self) -> list[str]:
        """Take up each local run whose server stopped, where this server predicts with its model_version: it goes
        on here (tasks with a prediction of that version are skipped). One that cannot be taken up is marked
        failed, with the reason; a second "Retrieve Predictions" predicts its tasks. The ids taken up."""
        taken = []
        for record in self.registry.runs():
            if record.cancel or not record.lost(time.time()):
                continue
            try:
                context = self.kept_context(record.project)
                why_not = self._why_not_background(record.project, [], context)
            except Exception as error:  # nothing kept for the project, an unusable config: say why
                why_not = f"{type(error).__name__}: {error}"
            if not why_not and context.model_version != record.model_version:
                why_not = f"this server predicts as {context.model_version}, the run as {record.model_version}"
            if why_not:
                log.warning("background run %s of project %s stopped with its server and cannot be taken up here "
                            "(%s): a second Retrieve Predictions predicts its tasks", record.id, record.project,
                            why_not)
                self.registry.update(record.id, lambda found: dataclasses.replace(  # unless another took it up
                    found, state="failed", reason=f"its server stopped; not taken up: {why_not}")
                    if found.lost(time.time()) else None)
                continue
            adopted = self.registry.adopt(record.id)
            if adopted is not None:
                log.info("background run %s of project %s: taken up after its server stopped, %d tasks",
                         record.id, record.project, record.total)
                self._run_here(adopted, context)
                taken.append(record.id)
        return taken

    @staticmethod
    def _why_not_background(project: object, tasks: Sequence[Task], context: ProjectContext) -> str:
        if project_id(project) is None:
            return "the request names no project"
        if any(task.id is None for task in tasks):
            return "a task has no id"
        if not (context.access.url and context.access.api_key):
            return ("no Label Studio access to write predictions with: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                    "(or let Label Studio send its host and token in /setup)")
        return ""

    def stop(self) -> None:
        """At shutdown: a local run ends with the process; its record goes stale, and the next server with the
        same model_version takes it up."""
        self._stopping.set()
        self.local.stop()

    def runs(self) -> list[dict]:
        """Every background run, newest first, as ``GET /jobs`` lists them."""
        return [described(current(record, self.connection, self.local)) for record in self.registry.runs()]

    def cancel(self, run_id: str) -> dict | None:
        record = cancel(self.registry, run_id, self.connection, self.local)
        return described(record) if record is not None else None

    def _active_count(self) -> tuple[int, int]:
        """Runs going, and their tasks without an outcome (Prometheus reads them at each scrape)."""
        try:
            going = [record for record in (current(found, self.connection, self.local)
                                           for found in self.registry.runs()) if record.state in ACTIVE_STATES]
        except Exception:  # the store away: the scrape goes on
            return 0, 0
        return len(going), sum(record.total - record.done - record.skipped - record.failed for record in going)
