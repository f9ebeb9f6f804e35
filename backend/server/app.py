"""The FastAPI app: Label Studio's ML backend protocol (service.py's ``Backend``) over HTTP.

Endpoints and payloads are those of Label Studio's ML backends (``/health``, ``/setup``,
``/predict``, ``/webhook``, ``/versions``), plus ``/memory/{project}`` and ``/metrics`` for
Prometheus. Each route translates HTTP to one ``Backend`` call; the errors the calls raise
become their HTTP answers here.
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

from backend.labelstudio.config import LabelConfigError
from backend.labelstudio.interaction import ContextError
from backend.options import OptionError
from backend.pipeline.segmenter import Segmenter
from backend.server.inference import ModelsNotReadyError, QueueFullError
from backend.server.limits import RequestSizeLimit
from backend.server.protocol import PredictRequest, SetupRequest, TrainRequest, WebhookRequest
from backend.server.request_bound import RequestBound, RequestStopped
from backend.server.service import (Backend, InferenceError, MemoryUnreadableError, NoMemoryError, NoRunError,
                                    NotAProjectError, TooManyEventsError)
from backend.settings import Settings, get_settings

log = logging.getLogger(__name__)

# The Backend's refusals and their HTTP statuses; the body is {"error": ..., "kind": ...}.
_REFUSALS = {NotAProjectError: 400, NoMemoryError: 404, NoRunError: 404, TooManyEventsError: 413,
             MemoryUnreadableError: 503}


def create_app(settings: Settings | None = None, load_segmenter: Callable[[], Segmenter] | None = None) -> FastAPI:
    """The app; ``load_segmenter`` replaces model loading (tests simulate a slow load with it)."""
    settings = settings or get_settings()
    backend = Backend(settings, load_segmenter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend.start()
        yield
        await asyncio.to_thread(backend.stop)

    # The schema and its page are routes of ours below, so that basic auth guards them too.
    app = FastAPI(title="freesegdiff", version=backend.version, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    _answer_errors(app, backend)
    _protocol_routes(app, backend, [Depends(_basic_auth(settings))])
    app.state.backend = backend
    app.state.worker, app.state.metrics, app.state.cache_writer = backend.worker, backend.metrics, backend.cache_writer
    app.state.learner, app.state.memories, app.state.label_configs = (backend.learner, backend.memories,
                                                                      backend.label_configs)
    return app


def _answer_errors(app: FastAPI, backend: Backend) -> None:
    """The HTTP answers of the errors the Backend's calls raise."""
    errors, retry_after = backend.metrics.errors, str(backend.settings.retry_after_seconds)

    @app.exception_handler(LabelConfigError)
    @app.exception_handler(ContextError)
    @app.exception_handler(OptionError)
    async def bad_request(request: Request, error: ValueError) -> JSONResponse:
        errors.labels(kind={LabelConfigError: "label_config", ContextError: "context"}.get(type(error),
                                                                                          "options")).inc()
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(QueueFullError)
    @app.exception_handler(ModelsNotReadyError)
    async def busy(request: Request, error: RuntimeError) -> JSONResponse:
        errors.labels(kind="queue_full" if isinstance(error, QueueFullError) else "not_ready").inc()
        return JSONResponse({"error": str(error)}, status_code=503, headers={"Retry-After": retry_after})

    @app.exception_handler(RequestStopped)
    async def stopped(request: Request, error: RequestStopped) -> JSONResponse:
        errors.labels(kind=error.kind).inc()
        log.warning("/predict stopped: %s", error)
        return JSONResponse({"error": str(error), "kind": error.kind}, status_code=error.status)

    @app.exception_handler(InferenceError)
    async def failed(request: Request, error: InferenceError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=500)

    async def refused(request: Request, error: Exception) -> JSONResponse:  # counted by the Backend where it counts
        return JSONResponse({"error": str(error), "kind": error.kind}, status_code=_REFUSALS[type(error)])

    for refusal in _REFUSALS:
        app.add_exception_handler(refusal, refused)


def _protocol_routes(app: FastAPI, backend: Backend, authenticated: list) -> None:
    """One route per verb, each one Backend call; all but /health behind basic auth."""

    @app.head("/health", include_in_schema=False)  # probes that want the status alone
    @app.get("/health")
    async def health() -> JSONResponse:
        """The only endpoint open without basic auth: Label Studio's and the container's health checks."""
        body = backend.health()
        return JSONResponse(body, status_code=503 if body["status"] == "ERROR" else 200)

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
        return {"model_version": await backend.setup(request)}

    @app.post("/predict", dependencies=authenticated)
    async def predict(request: PredictRequest, http: Request) -> dict:
        async with RequestBound.of(http.receive, backend.settings.predict_deadline_seconds) as bound:
            return await backend.predict(request, bound)

    @app.post("/webhook", dependencies=authenticated)
    async def webhook(request: WebhookRequest, background: BackgroundTasks) -> dict:
        answer = backend.webhook(request)
        background.add_task(backend.record_feedback, request)  # after answering: Label Studio waits for us
        return answer

    @app.post("/train", dependencies=authenticated)
    async def train(request: TrainRequest) -> dict:
        return backend.train(request)

    @app.get("/memory/{project}", dependencies=authenticated)
    async def memory(project: str) -> dict:
        return await backend.memory(project)

    @app.get("/jobs", dependencies=authenticated)
    async def jobs() -> dict:
        return {"jobs": await asyncio.to_thread(backend.jobs)}

    @app.delete("/jobs/{run_id}", dependencies=authenticated)
    async def cancel_job(run_id: str) -> dict:
        return await asyncio.to_thread(backend.cancel_job, run_id)

    @app.get("/versions", dependencies=authenticated)
    async def versions() -> dict:
        return {"versions": backend.versions()}

    @app.get("/metrics", dependencies=authenticated)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(backend.metrics.registry), media_type=CONTENT_TYPE_LATEST)


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
