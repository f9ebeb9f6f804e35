"""The FastAPI app: Label Studio's ML backend protocol over the segmentation pipeline.

Endpoints and payloads are those of Label Studio's ML backends (``/health``, ``/setup``,
``/predict``, ``/webhook``, ``/versions``), plus ``/metrics`` for Prometheus. ``/health``
and ``/setup`` never wait on the models: Label Studio gives them one and three seconds.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backend.storage.backing import feature_cache, feedback_store, project_memories
from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.backoff import Backoff
from backend.labelstudio.config import LabelConfigError, parse_label_config
from backend.labelstudio.interaction import ContextError, parse_context
from backend.labelstudio.teacher import ProjectTeacher
from backend.labelstudio.project_context import label_studio_access, project_context
from backend.labelstudio.projects import ProjectSetup, ProjectStore, project_id
from backend.storage.memory_summary import MemorySummary
from backend.models.assembly import downloads_wanted, ensure_downloaded
from backend.options import OptionError, option_changes
from backend.models.identity import model_version
from backend.models.process import process_segmenter
from backend.pipeline.exemplars import Exemplars
from backend.pipeline.memory import MemoryFormatError
from backend.pipeline.segmenter import Segmenter
from backend.server.cache_writer import CacheWriter
from backend.server.config_cache import LabelConfigCache
from backend.server.feedback_recorder import ANNOTATION_ACTIONS, FeedbackRecorder
from backend.server.learner import (FORGET_ACTIONS, LEARN_ACTIONS, PROJECT_DELETED_ACTION, TASKS_DELETED_ACTION,
                                    TRAIN_ACTION, Learner, QueueBounds)
from backend.server.learning_queue import LearningEvent, PendingEvents
from backend.server.limits import RequestSizeLimit
from backend.server.prometheus import Metrics
from backend.server.predictions import Predictor
from backend.server.protocol import PredictRequest, SetupRequest, TrainRequest, WebhookRequest, listed_ids
from backend.server.request_bound import RequestBound, RequestStopped
from backend.server.inference import InferenceWorker, ModelsNotReadyError, ModelState, QueueFullError
from backend.settings import Settings, get_settings
from backend.storage.shared_store import StoreError

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, load_segmenter: Callable[[], Segmenter] | None = None) -> FastAPI:
    """The app; ``load_segmenter`` replaces model loading (tests simulate a slow load with it)."""
    settings = settings or get_settings()
    metrics = Metrics()
    version = model_version(settings)
    memories = project_memories(settings)
    shared = memories.store.store
    projects = ProjectStore(shared)

    def load() -> Segmenter:
        return (load_segmenter or (lambda: process_segmenter(settings)))().observed_by(metrics.observe_stage)

    download = (lambda: ensure_downloaded(settings)) if load_segmenter is None and downloads_wanted(settings) else None
    worker = InferenceWorker(load, settings.queue_size, on_state=metrics.set_model_state,
                             on_depth=metrics.queue_depth.set, max_batch=settings.max_batch,
                             max_wait_seconds=settings.max_wait_ms / 1000, download=download,
                             load_wait_seconds=settings.load_wait_seconds)
    cache = feature_cache(settings, metrics.cache_metrics())
    feedback = FeedbackRecorder(feedback_store(settings), metrics,
                                Backoff.from_settings(settings), settings.max_image_pixels)
    cache_writer = CacheWriter(cache, settings.cache_write_queue, on_skip=metrics.cache_skipped_writes.inc)
    predictor = Predictor(settings, worker, metrics, cache, cache_writer)
    vocabulary_of = LabelConfigCache(lambda xml: parse_label_config(xml, settings.max_labels),
                                     settings.config_cache_bytes)

    def teacher() -> ProjectTeacher:
        worker.wait_until_loaded()
        worker.ensure_ready()
        return ProjectTeacher(memories, projects, predictor.images, predictor.encoding, worker.fingerprint,
                              Backoff.from_settings(settings), settings.max_labels)

    def project_access(project: object) -> LabelStudioAccess:
        """Label Studio's address and key for the project's annotations. Raises StoreError while the store is
        away (and LABEL_STUDIO_URL unset): the learner waits for it rather than go without."""
        return label_studio_access(settings, lambda: projects.read(project))

    learner = Learner(teacher, project_access, PendingEvents(shared),
                      QueueBounds(settings.learn_queue_size, settings.learn_project_queue_size),
                      Backoff.from_settings(settings), metrics)

    def project_memory(project: object) -> tuple[str, Exemplars | None]:
        """The project's model_version (the memory's revision as a suffix) and exemplars; none before the models."""
        key = project_id(project)
        if key is None or worker.state != ModelState.READY:
            return version, None
        try:
            return memories.for_predictions(key, worker.fingerprint, version)
        except Exception as error:  # StoreError, an unreadable memory: predict without it, said in the log
            log.warning("project %s: its memory could not be read, predicting without it: %s", key, error)
            metrics.errors.labels(kind="memory").inc()
            return version, None

    def keep_setup(project: object, setup: ProjectSetup) -> str:
        """Keep what /setup said for every process (logged when the store fails); the project's model_version."""
        if project_id(project) is None:
            log.warning("/setup without a project id (%r): nothing kept", project)
        else:
            try:
                projects.save(project, setup)
            except StoreError as error:  # Label Studio still gets its answer; predictions use their own config
                log.error("project %s: its setup could not be kept, so only this request has it: %s",
                          project_id(project), error)
                metrics.errors.labels(kind=error.kind).inc()
        return project_memory(project)[0]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        learner.start()
        yield
        await asyncio.to_thread(learner.stop)
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(cache_writer.stop)

    # The schema and its page are routes of ours below, so that basic auth guards them too.
    app = FastAPI(title="freesegdiff", version=version, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    authenticated = [Depends(_basic_auth(settings))]

    def count(endpoint: str) -> None:
        metrics.requests.labels(endpoint=endpoint).inc()

    @app.exception_handler(LabelConfigError)
    @app.exception_handler(ContextError)
    @app.exception_handler(OptionError)
    async def bad_request(request: Request, error: ValueError) -> JSONResponse:
        kind = {LabelConfigError: "label_config", ContextError: "context"}.get(type(error), "options")
        metrics.errors.labels(kind=kind).inc()
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(QueueFullError)
    @app.exception_handler(ModelsNotReadyError)
    async def busy(request: Request, error: RuntimeError) -> JSONResponse:
        metrics.errors.labels(kind="queue_full" if isinstance(error, QueueFullError) else "not_ready").inc()
        headers = {"Retry-After": str(settings.retry_after_seconds)}
        return JSONResponse({"error": str(error)}, status_code=503, headers=headers)

    @app.exception_handler(RequestStopped)
    async def stopped(request: Request, error: RequestStopped) -> JSONResponse:
        metrics.errors.labels(kind=error.kind).inc()
        log.warning("/predict stopped: %s", error)
        return JSONResponse({"error": str(error), "kind": error.kind}, status_code=error.status)

    @app.head("/health", include_in_schema=False)  # probes that want the status alone
    @app.get("/health")
    async def health() -> JSONResponse:
        """The only endpoint open without basic auth: Label Studio's and the container's health checks."""
        count("health")
        body = {"status": "UP", "model_class": "FreeSegDiff", "model_state": worker.state.value,
                "model_version": version, "queue_depth": worker.depth}
        if worker.state == ModelState.FAILED:
            return JSONResponse({**body, "status": "ERROR", "error": worker.error}, status_code=503)
        return JSONResponse(body)

    @app.get("/", dependencies=authenticated)
    async def root() -> JSONResponse:
        return await health()

    @app.get("/openapi.json", include_in_schema=False, dependencies=authenticated)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=authenticated)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="freesegdiff API")

    @app.post("/setup", dependencies=authenticated)
    async def setup(request: SetupRequest) -> dict:
        count("setup")
        if request.schema_:
            vocabulary_of(request.schema_)  # refuse an unusable config now, not at every prediction
        options = option_changes(request.extra_params or {}, where=lambda name: f"extra_params.{name}")
        setup = ProjectSetup(request.schema_, options, LabelStudioAccess(request.hostname, request.access_token))
        try:  # Label Studio gives /setup 3 s: a stalled store must not hold the answer
            project_version = await asyncio.wait_for(asyncio.to_thread(keep_setup, request.project, setup),
                                                     settings.setup_store_seconds)
        except TimeoutError:
            log.error("project %s: the store did not answer /setup within %.1f s (FREESEG_SETUP_STORE_SECONDS): "
                      "its setup may not be kept", project_id(request.project), settings.setup_store_seconds)
            metrics.errors.labels(kind="store").inc()
            project_version = version
        return {"model_version": project_version}

    @app.post("/predict", dependencies=authenticated)
    async def predict(request: PredictRequest, http: Request) -> dict:
        count("predict")
        async with RequestBound.of(http.receive, settings.predict_deadline_seconds) as bound:
            return await predict_within(request, bound)

    async def predict_within(request: PredictRequest, bound: RequestBound) -> dict:
        known = await asyncio.to_thread(projects.load, request.project)
        label_config = request.label_config or known.schema
        if not label_config:
            raise LabelConfigError("the request has no label_config and /setup was not called for this project")
        vocabulary = vocabulary_of(label_config)
        interaction = parse_context(request.params.context if request.params else None, vocabulary,
                                    settings.prompt_limits)
        if worker.state != ModelState.READY:  # just started: wait for the models rather than answer 503
            await asyncio.to_thread(worker.wait_until_loaded)
        context = project_context(settings, vocabulary, known,
                                  await asyncio.to_thread(project_memory, request.project))
        try:
            results = await predictor.predict(request.tasks, context, bound, interaction)
        except (QueueFullError, ModelsNotReadyError, RequestStopped):
            raise
        except Exception as error:  # an inference failure answers this request; the server goes on
            log.exception("inference failed for %d tasks", len(request.tasks))
            metrics.errors.labels(kind="inference").inc()
            raise HTTPException(500, f"inference failed: {type(error).__name__}: {error}") from error
        return {"results": results, "model_version": context.model_version}

    @app.post("/webhook", dependencies=authenticated)
    async def webhook(request: WebhookRequest, background: BackgroundTasks) -> dict:
        """Answers at once, touching no store: Label Studio gives it one second and never sends it again."""
        count("webhook")
        events = _learning_events(request)
        named = sum(event.size for event in events)
        if named > settings.learn_events_per_request:  # refused whole: a part would be learned, the rest never
            metrics.errors.labels(kind="too_many_events").inc()
            return JSONResponse({"error": f"the webhook names {named} annotations or tasks, over the limit of "
                                          f"{settings.learn_events_per_request} (FREESEG_LEARN_EVENTS_PER_REQUEST)",
                                 "kind": "too_many_events"}, status_code=413)
        if request.action in ANNOTATION_ACTIONS:  # compared after answering: Label Studio waits for us
            background.add_task(_record_feedback, feedback, request.model_dump(),
                                lambda: project_access(request.project), metrics)
        for event in events:
            learner.submit(event)
        return {"status": "ok", "action": request.action}

    @app.post("/train", dependencies=authenticated)
    async def train(request: TrainRequest) -> dict:
        """The older "Start Training" request; its annotations are ignored: the rebuild reads them from the API."""
        count("train")
        key = project_id(request.project)
        if key is None:
            raise HTTPException(400, "the training request names no project")
        learner.submit(LearningEvent("rebuild", key))
        return {"status": "ok", "job_id": f"rebuild-{key}"}

    @app.get("/memory/{project}", dependencies=authenticated)
    async def memory(project: str) -> JSONResponse:
        """What the project's memory was taught, as ``freesegdiff learn --show`` prints it; 404 without one."""
        count("memory")
        key = project_id(project)
        if key is None:
            return JSONResponse({"error": f"{project!r} is not a project id", "kind": "project"}, status_code=400)
        if worker.state != ModelState.READY:  # the memory is keyed by the loaded models' fingerprint
            await asyncio.to_thread(worker.wait_until_loaded)
        worker.ensure_ready()
        try:
            loaded = await asyncio.to_thread(memories.load, key, worker.fingerprint)
        except (StoreError, MemoryFormatError) as error:  # the detail names MODEL_DIR's paths: the log only
            kind = "store" if isinstance(error, StoreError) else "memory"
            log.error("project %s: its memory could not be read: %s", key, error)
            metrics.errors.labels(kind=kind).inc()
            return JSONResponse({"error": f"project {key}: its memory could not be read ({kind}); see the "
                                 "server's log", "kind": kind}, status_code=503)
        if loaded is None:
            return JSONResponse({"error": f"project {key} has no memory for these models", "kind": "no_memory"},
                                status_code=404)
        return JSONResponse(MemorySummary.of(key, loaded, version).to_dict())

    @app.get("/versions", dependencies=authenticated)
    async def versions() -> dict:
        count("versions")
        return {"versions": [version]}

    @app.get("/metrics", dependencies=authenticated)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.worker, app.state.metrics, app.state.cache_writer = worker, metrics, cache_writer
    app.state.learner, app.state.memories, app.state.label_configs = learner, memories, vocabulary_of
    return app


def _record_feedback(recorder: FeedbackRecorder, payload: dict, access: Callable[[], LabelStudioAccess],
                     metrics: Metrics) -> None:
    try:
        recorder.record(payload, access())
    except Exception:  # feedback is a by-product: a failure is logged and counted, never raised
        log.exception("recording annotation feedback failed")
        metrics.errors.labels(kind="feedback").inc()


def _learning_events(request: WebhookRequest) -> list[LearningEvent]:
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


def _basic_auth(settings: Settings) -> Callable[[HTTPBasicCredentials | None], None]:
    """A dependency that demands BASIC_AUTH_USER/BASIC_AUTH_PASS when both are set."""
    scheme = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(scheme)) -> None:
        if not (settings.basic_auth_user and settings.basic_auth_pass):
            return
        valid = credentials is not None and (
            secrets.compare_digest(credentials.username.encode(), settings.basic_auth_user.encode())
            & secrets.compare_digest(credentials.password.encode(), settings.basic_auth_pass.encode())
        )
        if not valid:
            raise HTTPException(401, "basic authentication required", headers={"WWW-Authenticate": "Basic"})

    return check
