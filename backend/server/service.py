"""Label Studio's ML backend protocol as one object: a method per verb, no HTTP.

``Backend`` is what label-studio-ml's ``LabelStudioMLBase`` is to its backends: ``setup``,
``predict``, ``webhook`` and ``train``, ``memory``, ``health``, with ``start``/``stop`` for the
process's life. It owns the parts the verbs share (the inference worker, the feature cache,
the learner, the stores) and answers with plain values; a request it refuses raises an error
with a ``kind``, which app.py turns into the HTTP answer. ``/health`` and ``/setup`` never wait
on the models: Label Studio gives them one and three seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.backoff import Backoff
from backend.labelstudio.config import LabelConfigError, parse_label_config
from backend.labelstudio.interaction import parse_context
from backend.labelstudio.project_context import (ProjectContext, ProjectMemory, label_studio_access, project_context,
                                                 project_model_version)
from backend.labelstudio.projects import ProjectSetup, ProjectStore, project_id
from backend.labelstudio.teacher import ProjectTeacher
from backend.models.assembly import downloads_wanted, ensure_downloaded
from backend.models.identity import model_version
from backend.models.process import process_segmenter
from backend.options import option_changes
from backend.pipeline.memory import MemoryFormatError
from backend.pipeline.segmenter import Segmenter
from backend.server.cache_writer import CacheWriter
from backend.server.config_cache import LabelConfigCache
from backend.server.feedback_recorder import ANNOTATION_ACTIONS, FeedbackRecorder
from backend.server.inference import InferenceWorker, ModelsNotReadyError, ModelState, QueueFullError
from backend.server.learner import (FORGET_ACTIONS, LEARN_ACTIONS, PROJECT_DELETED_ACTION, TASKS_DELETED_ACTION,
                                    TRAIN_ACTION, Learner, QueueBounds)
from backend.server.learning_queue import LearningEvent, PendingEvents
from backend.server.background import Background
from backend.server.predictions import Predictor
from backend.server.prometheus import Metrics
from backend.server.protocol import PredictRequest, SetupRequest, TrainRequest, WebhookRequest, listed_ids
from backend.server.request_bound import RequestBound, RequestStopped
from backend.settings import Settings
from backend.storage.backing import feature_cache, feedback_store, project_memories
from backend.storage.memory_summary import MemorySummary
from backend.storage.shared_store import StoreError

log = logging.getLogger(__name__)


class NotAProjectError(ValueError):
    """The request names no project, or not one by a project id."""

    kind = "project"


class TooManyEventsError(ValueError):
    """A webhook naming more annotations or tasks than FREESEG_LEARN_EVENTS_PER_REQUEST."""

    kind = "too_many_events"


class NoMemoryError(LookupError):
    """The project has no memory for the loaded models."""

    kind = "no_memory"


class NoRunError(LookupError):
    """No background run of that id."""

    kind = "no_run"


class MemoryUnreadableError(RuntimeError):
    """The project's memory could not be read; ``kind`` is ``store`` or ``memory``, the detail is in the log."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class InferenceError(RuntimeError):
    """The pipeline failed on a request's tasks: that request fails, the server goes on."""

    kind = "inference"


class Backend:
    """The protocol's verbs over the segmentation pipeline; ``load_segmenter`` replaces model loading (tests
    simulate a slow load with it)."""

    def __init__(self, settings: Settings, load_segmenter: Callable[[], Segmenter] | None = None) -> None:
        self.settings, self.metrics, self.version = settings, Metrics(), model_version(settings)
        self.memories = project_memories(settings)
        shared = self.memories.store.store
        self.projects = ProjectStore(shared)
        self.worker = _inference_worker(settings, self.metrics, load_segmenter)
        cache = feature_cache(settings, self.metrics.cache_metrics())
        self.cache_writer = CacheWriter(cache, settings.cache_write_queue, on_skip=self.metrics.cache_skipped_writes.inc)
        self.predictor = Predictor(settings, self.worker, self.metrics, cache, self.cache_writer)
        # requests over FREESEG_PREDICT_BUDGET_SECONDS are answered at once and predicted in a background run
        self.background = Background(settings, self.worker, self.predictor, shared, self.metrics, self._kept_context)
        self.feedback = FeedbackRecorder(feedback_store(settings),
                                         self.metrics, Backoff.from_settings(settings), settings.max_image_pixels)
        self.label_configs = LabelConfigCache(lambda xml: parse_label_config(xml, settings.max_labels),
                                              settings.config_cache_bytes)
        self.learner = Learner(self._teacher, self._project_access, PendingEvents(shared),
                               QueueBounds(settings.learn_queue_size, settings.learn_project_queue_size),
                               Backoff.from_settings(settings), self.metrics)

    def start(self) -> None:
        """Start loading the models, learning what was left pending, and taking up the background runs left."""
        self.worker.start()
        self.learner.start()
        self.background.start()

    def stop(self) -> None:
        """Finish learning and inference, and the cache writes; blocks."""
        self.learner.stop()
        self.background.stop()
        self.worker.stop()
        self.cache_writer.stop()

    def health(self) -> dict:
        """``status`` ``UP``, or ``ERROR`` with the ``error`` when the models failed to load."""
        self._count("health")
        body = {"status": "UP", "model_class": "FreeSegDiff", "model_state": self.worker.state.value,
                "model_version": self.version, "queue_depth": self.worker.depth}
        if self.worker.state == ModelState.FAILED:
            return {**body, "status": "ERROR", "error": self.worker.error}
        return body

    def versions(self) -> list[str]:
        self._count("versions")
        return [self.version]

    async def setup(self, request: SetupRequest) -> str:
        """Check the label config and keep the connection for every process; the project's model_version."""
        self._count("setup")
        if request.schema_:
            self.label_configs(request.schema_)  # refuse an unusable config now, not at every prediction
        options = option_changes(request.extra_params or {}, where=lambda name: f"extra_params.{name}")
        setup = ProjectSetup(request.schema_, options, LabelStudioAccess(request.hostname, request.access_token))
        try:  # Label Studio gives /setup 3 s: a stalled store must not hold the answer
            return await asyncio.wait_for(asyncio.to_thread(self._keep_setup, request.project, setup),
                                          self.settings.setup_store_seconds)
        except TimeoutError:
            log.error("project %s: the store did not answer /setup within %.1f s (FREESEG_SETUP_STORE_SECONDS): "
                      "its setup may not be kept", project_id(request.project), self.settings.setup_store_seconds)
            self.metrics.errors.labels(kind="store").inc()
            return self.version

    async def predict(self, request: PredictRequest, bound: RequestBound) -> dict:
        """The tasks' predictions and their model_version; work stops when ``bound`` says so."""
        self._count("predict")
        known = await asyncio.to_thread(self.projects.load, request.project)
        label_config = request.label_config or known.schema
        if not label_config:
            raise LabelConfigError("the request has no label_config and /setup was not called for this project")
        vocabulary = self.label_configs(label_config)
        interaction = parse_context(request.params.context if request.params else None, vocabulary,
                                    self.settings.prompt_limits)
        if self.worker.state != ModelState.READY:  # just started: wait for the models rather than answer busy
            await asyncio.to_thread(self.worker.wait_until_loaded)
        memory = await asyncio.to_thread(self._project_memory, request.project)
        context = project_context(self.settings, vocabulary, known, memory)
        try:
            results = await self.background.predict(request.project, request.tasks, context, bound, interaction)
        except (QueueFullError, ModelsNotReadyError, RequestStopped):
            raise
        except Exception as error:  # an inference failure answers this request; the server goes on
            log.exception("inference failed for %d tasks", len(request.tasks))
            self.metrics.errors.labels(kind="inference").inc()
            raise InferenceError(f"inference failed: {type(error).__name__}: {error}") from error
        return {"results": results, "model_version": context.model_version}

    def jobs(self) -> list[dict]:
        """The background runs /predict started, newest first."""
        self._count("jobs")
        return self.background.runs()

    def cancel_job(self, run_id: str) -> dict:
        """Cancel a background run; NoRunError when there is none of that id."""
        self._count("jobs")
        run = self.background.cancel(run_id)
        if run is None:
            raise NoRunError(f"no background run {run_id}")
        return run

    def webhook(self, request: WebhookRequest) -> dict:
        """Queue what the webhook asks to learn, touching no store: Label Studio gives it one second and never
        sends it again. Its feedback is ``record_feedback``'s, after the answer."""
        self._count("webhook")
        events = learning_events(request)
        named = sum(event.size for event in events)
        if named > self.settings.learn_events_per_request:  # refused whole: a part would be learned, the rest never
            self.metrics.errors.labels(kind=TooManyEventsError.kind).inc()
            raise TooManyEventsError(f"the webhook names {named} annotations or tasks, over the limit of "
                                     f"{self.settings.learn_events_per_request} (FREESEG_LEARN_EVENTS_PER_REQUEST)")
        for event in events:
            self.learner.submit(event)
        return {"status": "ok", "action": request.action}

    def record_feedback(self, request: WebhookRequest) -> None:
        """Compare an annotation with our prediction of its task (a by-product: failures are logged and counted)."""
        if request.action not in ANNOTATION_ACTIONS:
            return
        try:
            self.feedback.record(request.model_dump(), self._project_access(request.project))
        except Exception:
            log.exception("recording annotation feedback failed")
            self.metrics.errors.labels(kind="feedback").inc()

    def train(self, request: TrainRequest) -> dict:
        """The older "Start Training" request; its annotations are ignored: the rebuild reads them from the API."""
        self._count("train")
        key = project_id(request.project)
        if key is None:
            raise NotAProjectError("the training request names no project")
        self.learner.submit(LearningEvent("rebuild", key))
        return {"status": "ok", "job_id": f"rebuild-{key}"}

    async def memory(self, project: str) -> dict:
        """What the project's memory was taught, as ``freesegdiff learn --show`` prints it."""
        self._count("memory")
        key = project_id(project)
        if key is None:
            raise NotAProjectError(f"{project!r} is not a project id")
        if self.worker.state != ModelState.READY:  # the memory is keyed by the loaded models' fingerprint
            await asyncio.to_thread(self.worker.wait_until_loaded)
        self.worker.ensure_ready()
        try:
            loaded = await asyncio.to_thread(self.memories.load, key, self.worker.fingerprint)
        except (StoreError, MemoryFormatError) as error:  # the detail names MODEL_DIR's paths: the log only
            kind = "store" if isinstance(error, StoreError) else "memory"
            log.error("project %s: its memory could not be read: %s", key, error)
            self.metrics.errors.labels(kind=kind).inc()
            raise MemoryUnreadableError(f"project {key}: its memory could not be read ({kind}); see the server's log",
                                        kind) from error
        if loaded is None:
            raise NoMemoryError(f"project {key} has no memory for these models")
        return MemorySummary.of(key, loaded, self.version).to_dict()

    def _count(self, endpoint: str) -> None:
        self.metrics.requests.labels(endpoint=endpoint).inc()

    def _teacher(self) -> ProjectTeacher:
        """The learner's, once the models are loaded; encodings through the feature cache."""
        self.worker.wait_until_loaded()
        self.worker.ensure_ready()
        encoder = self.predictor.encoder
        return ProjectTeacher(self.memories, self.projects, self.predictor.images,
                              lambda image: encoder.encode(image.data, image.pixels), self.worker.fingerprint,
                              Backoff.from_settings(self.settings), self.settings.max_labels)

    def _project_access(self, project: object) -> LabelStudioAccess:
        """Label Studio's address and key for the project's annotations. Raises StoreError while the store is
        away (and LABEL_STUDIO_URL unset): the learner waits for it rather than go without."""
        return label_studio_access(self.settings, lambda: self.projects.read(project))

    def _kept_context(self, project: int) -> ProjectContext:
        """The project's context from what /setup kept: a background run taken up after a restart has no request."""
        known = self.projects.load(project)
        if not known.schema:
            raise LabelConfigError(f"/setup kept no label config for project {project}")
        return project_context(self.settings, self.label_configs(known.schema), known, self._project_memory(project))

    def _project_memory(self, project: object) -> ProjectMemory | None:
        """The project's memory for predictions; none before the models, nor when it cannot be read (logged)."""
        key = project_id(project)
        if key is None or self.worker.state != ModelState.READY:
            return None
        try:
            return self.memories.exemplars(key, self.worker.fingerprint)
        except Exception as error:  # StoreError, an unreadable memory: predict without it, said in the log
            log.warning("project %s: its memory could not be read, predicting without it: %s", key, error)
            self.metrics.errors.labels(kind="memory").inc()
            return None

    def _keep_setup(self, project: object, setup: ProjectSetup) -> str:
        """Keep what /setup said for every process (logged when the store fails); the project's model_version."""
        if project_id(project) is None:
            log.warning("/setup without a project id (%r): nothing kept", project)
        else:
            try:
                self.projects.save(project, setup)
            except StoreError as error:  # Label Studio still gets its answer; predictions use their own config
                log.error("project %s: its setup could not be kept, so only this request has it: %s",
                          project_id(project), error)
                self.metrics.errors.labels(kind=error.kind).inc()
        return project_model_version(self.settings, self._project_memory(project))


def _inference_worker(settings: Settings, metrics: Metrics,
                      load_segmenter: Callable[[], Segmenter] | None) -> InferenceWorker:
    """The one thread that runs the models, loading them (downloaded first where wanted) when started."""

    def load() -> Segmenter:
        return (load_segmenter or (lambda: process_segmenter(settings)))().observed_by(metrics.observe_stage)

    download = (lambda: ensure_downloaded(settings)) if load_segmenter is None and downloads_wanted(settings) else None
    return InferenceWorker(load, settings.queue_size, on_state=metrics.set_model_state,
                           on_depth=metrics.queue_depth.set, max_batch=settings.max_batch,
                           max_wait_seconds=settings.max_wait_ms / 1000, download=download,
                           load_wait_seconds=settings.load_wait_seconds)


def learning_events(request: WebhookRequest) -> list[LearningEvent]:
    """What a webhook asks to learn; its payload only names annotations."""
    project = project_id(request.project)
    if project is None:
        return []
    if request.action == TRAIN_ACTION:
        return [LearningEvent("rebuild", project)]
    if request.action == PROJECT_DELETED_ACTION:
        return [LearningEvent("drop", project)]
    if request.action == TASKS_DELETED_ACTION:
        ids = tuple(listed_ids(request.tasks or []))
        return [LearningEvent("forget-tasks", project, task_ids=ids)] if ids else []
    if request.action in LEARN_ACTIONS + FORGET_ACTIONS:
        named = request.annotations if request.action in FORGET_ACTIONS else request.annotation
        named = named if isinstance(named, list) else [named] if named else []
        action = "forget" if request.action in FORGET_ACTIONS else "learn"
        return [LearningEvent(action, project, annotation) for annotation in listed_ids(named)]
    return []
