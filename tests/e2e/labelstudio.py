"""Helpers for end-to-end tests against a real Label Studio server and a real headless Chromium.

What they need, installed by ``scripts/setup-labelstudio.sh``:

- Label Studio 1.23.2 in its own virtual environment, ``.venv-labelstudio`` at the repository root
  (its pins differ from the project's);
- Debian's ``chromium`` at ``/usr/bin/chromium``, driven by Python's ``playwright`` from the project's
  environment. Playwright never downloads a browser here: it is launched with ``executable_path``.

Typical use::

    server = start_label_studio(tmp_path / "ls", free_port())
    try:
        project = create_project(server, LABEL_CONFIG)
        task = import_image_file(server, project, Path("photo.jpg"))
        ml = connect_ml_backend(server, project, "http://127.0.0.1:9090")
        retrieve_predictions(server, project)
        predictions = list_predictions(server, task)
        with BrowserCheck(server) as browser:
            view = browser.task_regions(project, task, screenshot=Path("task.png"))
    finally:
        server.stop()

Label Studio 1.23.2 behaviours these helpers account for:

- token authentication is off by default: the legacy API token must be enabled on the first start of a
  fresh data dir (``--enable-legacy-api-token``), after which ``Authorization: Token <token>`` works;
- calling an ML backend on 127.0.0.1 needs both ``ML_BLOCK_LOCAL_IP=false`` and
  ``SSRF_PROTECTION_ENABLED=false``;
- HTML pages do not accept the token: the browser logs in through ``/user/login/``;
- connecting a backend sets the project's ``model_version`` to the backend's title, while the
  predictions it stores carry the backend's own ``model_version`` (the one ``/setup`` answers). The
  "label all tasks" stream (``/api/projects/{id}/next/``) then depends on the project's value: equal to a
  connected backend's title, Label Studio asks that backend live while the page loads (``/health``,
  ``/setup``, and ``/predict`` for a task lacking a prediction of the ``/setup`` version) and shows nothing
  when the backend is down; equal to the stored predictions' version, it shows them without calling the
  backend (see :func:`set_project_model_version`). Opening a task from the data manager shows stored
  predictions either way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from tests.http_server import RecordingHandler, RecordingServer, send

REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_STUDIO_VENV = REPO_ROOT / ".venv-labelstudio"
LABEL_STUDIO_BIN = LABEL_STUDIO_VENV / "bin" / "label-studio"
CHROMIUM = Path("/usr/bin/chromium")

#: Flags that let Debian's Chromium run headless as root in a container with no outside network.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

DEFAULT_USERNAME = "e2e@example.com"  # Label Studio users are e-mail addresses
DEFAULT_PASSWORD = "e2e-password-1234"
DEFAULT_TOKEN = "e2e0123456789abcdef0123456789abcdef0123"  # legacy API token (any string longer than 5)

HTTP_TIMEOUT = 30.0  # seconds, for API calls that do not call the ML backend
PREDICT_TIMEOUT = 600.0  # seconds, for API calls that make Label Studio call the ML backend's /predict


class LabelStudioError(RuntimeError):
    """Label Studio did not start, or an API call did not do what was asked."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (another process may take it later: use it at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(no log at {path}: {error})"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------------------------
# The server


@dataclasses.dataclass
class LabelStudioServer:
    """A running Label Studio; :func:`start_label_studio` makes one."""

    url: str
    username: str
    password: str
    token: str
    process: subprocess.Popen
    data_dir: Path
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        """Headers that authenticate API calls with the legacy token."""
        return {"Authorization": f"Token {self.token}"}

    def api(self, method: str, path: str, *, timeout: float = HTTP_TIMEOUT, **kwargs: Any) -> requests.Response:
        """One authenticated API call (``path`` starts with ``/``); raises :class:`LabelStudioError` on non-2xx."""
        headers = {**self.headers, **kwargs.pop("headers", {})}
        response = requests.request(method, self.url + path, headers=headers, timeout=timeout, **kwargs)
        if not response.ok:
            raise LabelStudioError(f"{method} {path} -> HTTP {response.status_code}: {response.text[:2000]}")
        return response

    def client(self):
        """A ``label_studio_sdk.LabelStudio`` client authenticated with the legacy token."""
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.token, timeout=HTTP_TIMEOUT)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float = 20.0) -> None:
        """Stops the server (SIGTERM, then SIGKILL after ``timeout`` seconds); safe to call twice."""
        stop_process(self.process, timeout)


def stop_process(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stops a process started with ``start_new_session=True`` and its children: SIGTERM to its process group,
    SIGKILL after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    # The server runs in its own process group (start_new_session): signal the group it leads.
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=timeout)


def label_studio_env(data_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a test server runs with: everything stored in ``data_dir``, local backends allowed."""
    env = dict(os.environ if base is None else base)
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):  # the test's own venv must not leak into Label Studio's
        env.pop(name, None)
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            # token authentication for the API (off by default in 1.23.2)
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            # let Label Studio call an ML backend on 127.0.0.1: both are needed, either alone still gives 403
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            # serve files under data_dir through /data/local-files/?d=... (uploads work without this)
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(data_dir),
            # no calls to the outside world: no version check on PyPI, no analytics
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.setdefault("SECRET_KEY", "e2e-tests-only-not-a-secret")  # else a new random key (and a warning) per start
    return env


def start_label_studio(
    data_dir: Path,
    port: int,
    *,
    username: str = DEFAULT_USERNAME,
    password: str = DEFAULT_PASSWORD,
    token: str = DEFAULT_TOKEN,
    timeout: float = 120.0,
    extra_env: Mapping[str, str] | None = None,
) -> LabelStudioServer:
    """Starts Label Studio on 127.0.0.1:``port`` with its data (SQLite, uploads, log) in ``data_dir``.

    Waits until its API answers an authenticated call, at most ``timeout`` seconds (the first start on a
    fresh data dir runs the database migrations: about 25 s; later starts about 3 s). Raises
    :class:`LabelStudioError` with the tail of its log when it exits or does not answer in time. The log is
    ``data_dir / "label-studio.log"``.
    """
    if not LABEL_STUDIO_BIN.exists():
        raise LabelStudioError(f"{LABEL_STUDIO_BIN} is missing: run scripts/setup-labelstudio.sh")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir / "label-studio.log"
    command = [
        str(LABEL_STUDIO_BIN), "start",
        "--no-browser",
        "--port", str(port),
        "--internal-host", "127.0.0.1",
        "--username", username,
        "--password", password,
        "--user-token", token,
        "--enable-legacy-api-token",
    ]  # fmt: skip
    env = label_studio_env(data_dir)
    env.update(extra_env or {})
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = LabelStudioServer(url, username, password, token, process, data_dir, log_path)
    try:
        _wait_until_up(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_up(server: LabelStudioServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise LabelStudioError(
                f"Label Studio exited with code {code} before answering; log {server.log_path}:\n{server.log_tail()}"
            )
        try:
            # /api/current-user/whoami/ needs a working token: it proves the server, the user and the token
            response = requests.get(server.url + "/api/current-user/whoami", headers=server.headers, timeout=5)
            if response.ok:
                return
            last = f"HTTP {response.status_code}: {response.text[:300]}"
        except requests.RequestException as error:
            last = f"{type(error).__name__}: {error}"
        time.sleep(0.5)
    raise LabelStudioError(
        f"Label Studio did not answer at {server.url} within {timeout:.0f} s (last: {last}); "
        f"log {server.log_path}:\n{server.log_tail()}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# The API


def create_project(server: LabelStudioServer, label_config: str, title: str = "e2e") -> int:
    """Creates a project with ``label_config`` (XML); returns its id."""
    project = server.client().projects.create(title=title, label_config=label_config)
    return project.id


def import_image_file(server: LabelStudioServer, project: int, path: Path, field: str = "image") -> int:
    """Uploads an image file as one task; returns the task id. Its data holds ``{field: "/data/upload/..."}``.

    ``field`` must be the ``$variable`` of the config's ``<Image value=...>``: Label Studio names the data
    field of an uploaded file after it.
    """
    with open(path, "rb") as file:
        response = server.api(
            "POST",
            f"/api/projects/{project}/import",
            params={"return_task_ids": "true"},
            files={"file": (Path(path).name, file, _content_type(path))},
        )
    task_ids = response.json().get("task_ids") or []
    if len(task_ids) != 1:
        raise LabelStudioError(f"uploading {path} made tasks {task_ids}: {response.text[:500]}")
    task = get_task(server, task_ids[0])
    if not str(task["data"].get(field, "")).startswith("/data/upload/"):
        raise LabelStudioError(f"uploaded task {task_ids[0]} has no upload URL in data[{field!r}]: {task['data']}")
    return task_ids[0]


def _content_type(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    return {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}.get(
        suffix, "application/octet-stream"
    )


def import_tasks(server: LabelStudioServer, project: int, tasks: Sequence[Mapping[str, Any]]) -> list[int]:
    """Imports tasks given as JSON (each ``{"data": {...}}`` or a bare data dict); returns their ids."""
    response = server.api(
        "POST", f"/api/projects/{project}/import", params={"return_task_ids": "true"}, json=list(tasks)
    )
    task_ids = response.json().get("task_ids") or []
    if len(task_ids) != len(tasks):
        raise LabelStudioError(f"imported {len(tasks)} tasks, got ids {task_ids}: {response.text[:500]}")
    return task_ids


def import_image_url(server: LabelStudioServer, project: int, url: str, field: str = "image") -> int:
    """Imports one task whose image is a plain http(s) URL; returns the task id."""
    return import_tasks(server, project, [{"data": {field: url}}])[0]


def get_task(server: LabelStudioServer, task: int) -> dict[str, Any]:
    return server.api("GET", f"/api/tasks/{task}").json()


def connect_ml_backend(
    server: LabelStudioServer, project: int, url: str, title: str = "freesegdiff", *, is_interactive: bool = True,
    extra_params: Mapping[str, Any] | None = None,
) -> int:
    """Connects the ML backend at ``url`` to the project (``POST /api/ml``), with the connection's
    ``extra_params`` (sent to the backend's ``/setup``); returns the backend's id.

    Label Studio calls the backend's ``/health`` and ``/setup`` while connecting (1 s and 3 s timeouts);
    a backend that does not answer them in time is refused here. Note that 1.23.2 sets the project's
    ``model_version`` to ``title``.
    """
    response = server.api(
        "POST",
        "/api/ml",
        json={"project": project, "url": url, "title": title, "is_interactive": is_interactive,
              "extra_params": dict(extra_params or {})},
        timeout=HTTP_TIMEOUT,
    )
    backend = response.json()
    if backend.get("state") not in (None, "CO", "CONNECTED"):
        raise LabelStudioError(f"ML backend {url} connected in state {backend.get('state')}: {backend}")
    return backend["id"]


def get_ml_backend(server: LabelStudioServer, ml_backend: int) -> dict[str, Any]:
    return server.api("GET", f"/api/ml/{ml_backend}").json()


def retrieve_predictions(
    server: LabelStudioServer, project: int, task_ids: Sequence[int] | None = None, *, timeout: float = PREDICT_TIMEOUT
) -> dict[str, Any]:
    """Asks the project's ML backend for predictions of all tasks (or of ``task_ids``) and stores them.

    This is the data manager's "Retrieve predictions" action (``retrieve_tasks_predictions``). It runs
    synchronously: Label Studio sends one ``/predict`` call with the tasks that have no prediction of the
    backend's current model version yet, and answers when they are stored. Returns the action's JSON
    (1.23.2: ``{"processed_items": N, "detail": "Retrieved N predictions"}``, counting the selected tasks,
    not the stored predictions: read them back with :func:`list_predictions`).
    """
    selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": list(task_ids)}
    response = server.api(
        "POST",
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project},
        json={"selectedItems": selected},
        timeout=timeout,
    )
    return response.json()


def list_predictions(server: LabelStudioServer, task: int) -> list[dict[str, Any]]:
    """The predictions stored for one task (``GET /api/predictions?task=``), as JSON dicts."""
    return server.api("GET", "/api/predictions/", params={"task": task}).json()


def tasks_by_prediction_score(server: LabelStudioServer, project: int) -> list[dict[str, Any]]:
    """The project's tasks in the data manager's order by prediction score, lowest first (``GET /api/tasks``).

    Each carries ``predictions_score``: Label Studio's mean score of the task's predictions of the project's
    ``model_version`` (1.23.2, ``data_manager/managers.py``; None when the task has none of that version).
    """
    query = json.dumps({"ordering": ["tasks:predictions_score"]})
    response = server.api("GET", "/api/tasks/", params={"project": project, "fields": "all", "page_size": 1000,
                                                       "query": query})
    return response.json()["tasks"]


def get_project(server: LabelStudioServer, project: int) -> dict[str, Any]:
    return server.api("GET", f"/api/projects/{project}").json()


def set_project_model_version(
    server: LabelStudioServer, project: int, model_version: str, *, show_collab_predictions: bool = True
) -> dict[str, Any]:
    """Sets the project's ``model_version`` (the predictions the labeling stream shows) and
    ``show_collab_predictions``; returns the updated project.

    Label Studio refuses (HTTP 400) a version that is neither a connected backend's title nor the version of
    stored predictions. With ``show_collab_predictions`` off the stream shows no prediction at all.
    """
    response = server.api(
        "PATCH",
        f"/api/projects/{project}",
        json={"model_version": model_version, "show_collab_predictions": show_collab_predictions},
    )
    return response.json()


def interactive_annotating(
    server: LabelStudioServer, ml_backend: int, task: int, context: Mapping[str, Any] | None, *,
    timeout: float = PREDICT_TIMEOUT,
) -> dict[str, Any]:
    """Interactive pre-annotation (``POST /api/ml/{id}/interactive-annotating``): Label Studio sends the task
    and ``context`` (``{"result": [regions the user made]}``) to the backend's ``/predict`` and answers with
    ``{"data": <the backend's prediction>}`` or ``{"errors": [...]}`` (HTTP 200 in both cases)."""
    response = server.api(
        "POST",
        f"/api/ml/{ml_backend}/interactive-annotating",
        json={"task": task, "context": context},
        timeout=timeout,
    )
    return response.json()


def create_prediction(server: LabelStudioServer, task: int, model_version: str,
                      result: Sequence[Mapping[str, Any]] = (), score: float = 0.5) -> int:
    """Stores a prediction of ``model_version`` for ``task`` (``POST /api/predictions``); returns its id."""
    response = server.api("POST", "/api/predictions/",
                          json={"task": task, "model_version": model_version, "result": list(result), "score": score})
    return response.json()["id"]


def predictions_by_version(server: LabelStudioServer, task: int) -> dict[str, list[int]]:
    """The ids of the task's stored predictions, by ``model_version``."""
    found: dict[str, list[int]] = {}
    for prediction in list_predictions(server, task):
        found.setdefault(prediction["model_version"], []).append(prediction["id"])
    return found


class FlakyProxy:
    """A loopback HTTP proxy in front of Label Studio that can play an outage in the middle of a run.

    Requests are forwarded as they are (method, path, headers, body) and the answers relayed. After
    :meth:`outage_after` arms it, once ``count`` requests ``method path...`` have gone through, the next
    such request is still forwarded but answered ``502`` (Label Studio did the work, the client never
    hears so: a lost answer), and every request for ``seconds`` more is answered ``502`` without reaching
    Label Studio. ``statuses`` lists ``(method, path, status)`` of every request answered.
    """

    _HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host",
                             "content-encoding"})

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.statuses: list[tuple[str, str, int]] = []
        self._lock = threading.RLock()  # _answer records while holding it
        self._trigger: tuple[str, str, int, float] | None = None
        self._down_until = 0.0
        self._server = RecordingServer(fallback=self._relay).__enter__()
        self.url = self._server.url

    def _relay(self, handler: RecordingHandler) -> None:
        status, headers, content = self._answer(handler.command, handler.path, dict(handler.headers), handler.body)
        send(handler, status, content, headers)

    def outage_after(self, method: str, path: str, count: int, seconds: float) -> None:
        with self._lock:
            self._trigger = (method, path, count, seconds)

    def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        with self._lock:
            if time.monotonic() < self._down_until:
                return self._record(method, path, 502, {}, b"Bad Gateway (outage)")
            lose_answer = False
            if self._trigger and method == self._trigger[0] and path.startswith(self._trigger[1]):
                trigger_method, trigger_path, count, seconds = self._trigger
                if count == 0:
                    lose_answer, self._trigger = True, None
                    self._down_until = time.monotonic() + seconds
                else:
                    self._trigger = (trigger_method, trigger_path, count - 1, seconds)
        forwarded = {name: value for name, value in headers.items() if name.lower() not in self._HOP_BY_HOP}
        response = requests.request(method, self.target + path, headers=forwarded, data=body or None,
                                    allow_redirects=False, timeout=HTTP_TIMEOUT)
        if lose_answer:
            with self._lock:  # the outage lasts ``seconds`` from the lost answer, however long Label Studio took
                self._down_until = time.monotonic() + seconds
            return self._record(method, path, 502, {}, b"Bad Gateway (answer lost)")
        relayed = {name: value for name, value in response.headers.items() if name.lower() not in self._HOP_BY_HOP}
        return self._record(method, path, response.status_code, relayed, response.content)

    def _record(self, method: str, path: str, status: int, headers: dict, content: bytes) -> tuple[int, dict, bytes]:
        with self._lock:
            self.statuses.append((method, path, status))
        return status, headers, content

    def stop(self) -> None:
        self._server.__exit__()


# ---------------------------------------------------------------------------------------------------------------------
# The browser


@dataclasses.dataclass(frozen=True)
class ShownRegion:
    """One item of the labeling page's region list (the "outliner")."""

    title: str  # the label shown for it
    predicted: bool  # marked as coming from a prediction (the sparkle icon of ``__control_type_predict``)


@dataclasses.dataclass(frozen=True)
class PageView:
    """What the labeling page showed."""

    url: str
    regions: tuple[ShownRegion, ...]
    store_regions: int  # len(window.Htx.annotationStore.selected.regions)
    store_origins: tuple[str, ...]  # each store region's origin: "prediction", "prediction-changed" or "manual"
    store_predictions: int  # len(window.Htx.annotationStore.predictions): predictions the page received
    selected_type: str | None  # "annotation" or "prediction": the kind of the item the page selected (a task with
    # predictions and no annotation opens as a new annotation holding copies of the predicted regions)
    screenshot: Path | None
    blocked_requests: tuple[str, ...]  # requests to other hosts that the route handler aborted

    @property
    def titles(self) -> list[str]:
        return [region.title for region in self.regions]


class BrowserCheck:
    """Label Studio's own labeling page in headless Chromium (Playwright, sync API).

    A context manager: starts Chromium (``/usr/bin/chromium``) on enter, logs in through ``/user/login/``,
    and closes everything on exit. Requests to hosts other than the Label Studio server (analytics, error
    reporting, fonts) are aborted, except those of ``allow_hosts`` (``"host:port"``).
    """

    def __init__(
        self,
        server: LabelStudioServer,
        *,
        timeout: float = 60.0,
        allow_hosts: Sequence[str] = (),
        viewport: tuple[int, int] = (1400, 900),
    ) -> None:
        self.server = server
        self.timeout_ms = int(timeout * 1000)
        self.allowed = {urlsplit(server.url).netloc, *allow_hosts}
        self.viewport = viewport
        self.blocked: list[str] = []
        self._playwright = None
        self._browser = None
        self.page = None
        self._visited: set[int] = set()  # projects whose data manager this browser has opened

    def __enter__(self) -> BrowserCheck:  # noqa: PYI034 - typing.Self needs Python 3.11
        from playwright.sync_api import sync_playwright

        if not CHROMIUM.exists():
            raise LabelStudioError(f"{CHROMIUM} is missing: run scripts/setup-labelstudio.sh")
        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS), timeout=self.timeout_ms
            )
            context = self._browser.new_context(viewport={"width": self.viewport[0], "height": self.viewport[1]})
            context.set_default_timeout(self.timeout_ms)
            context.route("**/*", self._route)
            self.page = context.new_page()
            self._login()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._browser is not None:
            self._browser.close()
            self._browser = None
        if self._playwright is not None:
            self._playwright.stop()
            self._playwright = None

    def _route(self, route, request) -> None:
        parts = urlsplit(request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc not in self.allowed:
            self.blocked.append(request.url)
            route.abort()
        else:
            route.continue_()

    def _login(self) -> None:
        page = self.page
        page.goto(self.server.url + "/user/login/", wait_until="domcontentloaded")
        page.fill("#email", self.server.username)
        page.fill("#password", self.server.password)
        with page.expect_navigation(wait_until="domcontentloaded"):
            page.click(".login-button")
        if "/user/login" in page.url:
            raise LabelStudioError(f"login as {self.server.username} failed: still on {page.url}")

    def task_regions(self, project: int, task: int, screenshot: Path | None = None) -> PageView:
        """Opens ``/projects/{project}/data?task={task}`` (the task in the data manager's labeling view) and
        reads the regions shown once the page's store holds at least one."""
        return self._regions_at(project, f"/projects/{project}/data?task={task}", screenshot)

    def stream_regions(self, project: int, screenshot: Path | None = None) -> PageView:
        """Opens the "label all tasks" stream, which shows the next task with the predictions of the project's
        ``model_version`` (when ``show_collab_predictions`` is on).

        In 1.23.2 the stream is ``/projects/{project}/data?labeling=1`` (what the "Label All Tasks" button
        and the project menu's "Label" open); ``/projects/{project}/labeling`` is a 404 page.
        """
        return self._regions_at(project, f"/projects/{project}/data?labeling=1", screenshot)

    def _open_data_manager(self, project: int) -> None:
        """The first visit of a project's data manager creates its default tab (``?tab=N``) and then renders
        the labeling view again: a task opened during that visit can load its regions and then be replaced by
        an empty new annotation. Visiting the data manager once first avoids that race."""
        if project in self._visited:
            return
        self.page.goto(f"{self.server.url}/projects/{project}/data", wait_until="domcontentloaded")
        self.page.wait_for_url("**tab=*", timeout=self.timeout_ms)
        self._visited.add(project)

    def _regions_at(self, project: int, path: str, screenshot: Path | None) -> PageView:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        page = self.page
        self._open_data_manager(project)
        page.goto(self.server.url + path, wait_until="domcontentloaded")
        try:
            # The page fills its store asynchronously: wait for the store, not for the first list item.
            page.wait_for_function(
                "() => { const s = window.Htx && window.Htx.annotationStore && window.Htx.annotationStore.selected;"
                " return !!s && s.regions.length > 0; }",
                timeout=self.timeout_ms,
            )
            page.wait_for_selector(".lsf-outliner-item__title", timeout=self.timeout_ms)
            page.wait_for_load_state("load", timeout=self.timeout_ms)
        except PlaywrightTimeout as error:
            shot = self._failure_screenshot(screenshot)
            raise LabelStudioError(
                f"no region appeared at {path} within {self.timeout_ms / 1000:.0f} s (screenshot: {shot}; "
                f"blocked requests: {self.blocked[:10]}): {error}"
            ) from error
        items = page.eval_on_selector_all(
            ".lsf-outliner-item",
            """items => items.map(item => {
                const title = item.querySelector('.lsf-outliner-item__title');
                return {
                    title: title ? title.innerText.trim() : '',
                    // the control's element is there for every region; only predicted ones carry its icon
                    predicted: !!item.querySelector('.lsf-outliner-item__control_type_predict svg'),
                };
            })""",
        )
        store = page.evaluate(
            """() => { const a = window.Htx.annotationStore, s = a.selected;
                       return {count: s.regions.length, type: s.type || null,
                               origins: s.regions.map(r => String(r.origin)), predictions: a.predictions.length}; }"""
        )
        if screenshot is not None:
            screenshot = Path(screenshot)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=False)
        return PageView(
            url=page.url,
            regions=tuple(ShownRegion(item["title"], item["predicted"]) for item in items if item["title"]),
            store_regions=store["count"],
            store_origins=tuple(store["origins"]),
            store_predictions=store["predictions"],
            selected_type=store["type"],
            screenshot=screenshot,
            blocked_requests=tuple(self.blocked),
        )

    def _failure_screenshot(self, screenshot: Path | None) -> Path | None:
        if screenshot is None:
            return None
        path = Path(screenshot).with_name(Path(screenshot).stem + "-failure.png")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(path))
        except Exception:  # noqa: BLE001 - a failure screenshot must not hide the failure
            return None
        return path
