"""Security, end to end: basic auth on every route, where Label Studio's token goes, which image
hosts may be fetched, no pickle on any path that reads data, and no secret in any log record.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.routing import Route

import backend
from backend.pipeline.segmenter import Segmenter
from backend.settings import Settings
from tests.redis_server import free_port
from tests.test_images import encode
from tests.http_server import RecordingServer, send, serving
from tests.app_client import image_tasks, predict, predictions, ready_client

TOKEN = "ls-token-0123456789abcdef"
CONFIG = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image" model_k="2" model_refine="none"><Label value="sky"/><Label value="tree"/></BrushLabels>
</View>"""
OPEN_ROUTES = {"/health"}  # Label Studio's and the container's health check; "/" is an alias that is guarded


@contextmanager
def running(settings: Settings, segmenter: Segmenter) -> Iterator[TestClient]:
    """A client of the app with these settings and this segmenter, once its models are ready."""
    with ready_client(settings, lambda: segmenter) as client:
        yield client


@pytest.fixture
def image_bytes(china) -> bytes:
    return encode(Image.fromarray(china).resize((64, 48)), "PNG")


@pytest.fixture
def label_studio(image_bytes) -> Iterator[RecordingServer]:
    """Stands in for Label Studio, with one upload."""
    with RecordingServer() as server:
        server.routes["/data/upload/cat.png"] = serving(image_bytes)
        yield server


@pytest.fixture
def other(image_bytes) -> Iterator[RecordingServer]:
    """Another web server on this machine: a cloud bucket, a CDN, or something internal."""
    with RecordingServer() as server:
        server.routes["/img.png"] = serving(image_bytes)
        yield server


# --- basic auth ----------------------------------------------------------------------------


def test_basic_auth_guards_every_route_but_health(tiny_settings, tiny_segmenter):
    settings = tiny_settings.model_copy(update={"basic_auth_user": "labeller", "basic_auth_pass": "pa55-word"})
    checked = set()
    with running(settings, tiny_segmenter) as client:
        for route in client.app.routes:
            assert isinstance(route, Route), route
            for method in route.methods - {"HEAD"}:
                body = {} if method == "POST" else None
                statuses = [client.request(method, route.path, json=body, auth=auth).status_code
                            for auth in (None, ("labeller", "wrong"), ("someone", "pa55-word"), ("labeller", "pa55-word"))]
                if route.path in OPEN_ROUTES:
                    assert statuses == [200] * 4, (method, route.path)
                    continue
                assert statuses[:3] == [401] * 3 and statuses[3] not in (401, 403), (method, route.path, statuses)
                checked.add(route.path)
    assert {"/", "/setup", "/predict", "/webhook", "/versions", "/metrics", "/openapi.json", "/docs",
            "/memory/{project}"} <= checked


# --- Label Studio's token, and who may be fetched ------------------------------------------


def test_the_token_goes_only_to_label_studio(
    tiny_settings, tiny_segmenter, label_studio, other, tmp_path, monkeypatch
):
    """Nor do ~/.netrc passwords or Label Studio's cookies go to other hosts, on this machine or elsewhere."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login me password netrc-secret\nmachine localhost login me password netrc-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    label_studio.routes["/data/upload/moved.png"] = lambda handler: send(
        handler, 302, headers={"Location": f"{other.url}/img.png", "Set-Cookie": "sessionid=ls-session; Path=/"})
    settings = tiny_settings.model_copy(update={"label_studio_url": label_studio.url, "label_studio_api_key": TOKEN})
    label_studio_as_localhost = label_studio.url.replace("127.0.0.1", "localhost")  # same server, another origin
    with running(settings, tiny_segmenter) as client:
        tasks = image_tasks("/data/upload/cat.png", f"{other.url}/img.png", "/data/upload/moved.png",
                            f"{label_studio_as_localhost}/data/upload/cat.png", first_id=0)
        results = predictions(client, tasks, CONFIG)

    assert all(result["result"] for result in results)
    by_origin = {"label studio": [], "other": []}
    for request in label_studio.requests:
        by_origin["label studio" if request.headers["Host"].startswith("127.0.0.1") else "other"].append(request.headers)
    by_origin["other"] += [request.headers for request in other.requests]
    assert len(by_origin["label studio"]) == 2 and len(by_origin["other"]) == 3
    assert all(headers["Authorization"] == f"Token {TOKEN}" for headers in by_origin["label studio"])
    for headers in by_origin["other"]:
        assert "Authorization" not in headers and "Cookie" not in headers


def test_a_url_read_differently_by_the_check_and_the_client_reaches_no_one(
    tiny_settings, tiny_segmenter, label_studio, other, caplog
):
    """urllib.parse reads the host after the '@', requests the one before the backslash: such a URL once sent
    Label Studio's token to the other server, and passed the policy with a public address after the '@'."""
    caplog.set_level(logging.WARNING, logger="backend.server.predictions")
    other_port, ls_port = other.server_address[1], label_studio.server_address[1]
    settings = tiny_settings.model_copy(update={"label_studio_url": label_studio.url, "label_studio_api_key": TOKEN})
    with running(settings, tiny_segmenter) as client:
        tasks = image_tasks(f"http://127.0.0.1:{other_port}\\@127.0.0.1:{ls_port}/img.png", "/data/upload/cat.png",
                            first_id=0)
        leak = predictions(client, tasks, CONFIG)
    with running(settings.model_copy(update={"allow_private_urls": False}), tiny_segmenter) as client:
        tasks = image_tasks(f"http://127.0.0.1:{other_port}\\@93.184.216.34/img.png", "/data/upload/cat.png",
                            first_id=0)
        bypass = predictions(client, tasks, CONFIG)

    assert leak[0]["result"] == [] and bypass[0]["result"] == []
    assert leak[1]["result"] and bypass[1]["result"]
    assert other.requests == []
    assert [request.path for request in label_studio.requests] == ["/data/upload/cat.png"] * 2
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task 0:")]
    assert len(refusals) == 2 and all("a backslash ends the URL's host" in refusal for refusal in refusals)


@pytest.mark.parametrize(
    ("update", "url", "error"),
    [
        ({"allow_private_urls": False}, "{other}/img.png",
         "host 127.0.0.1 resolves to 127.0.0.1, a loopback address: set FREESEG_ALLOW_PRIVATE_URLS=true to allow it"),
        ({"allow_private_urls": False}, "http://169.254.169.254/latest/meta-data/",
         "169.254.169.254, a link-local address: set FREESEG_ALLOW_PRIVATE_URLS=true"),
        ({"allow_private_urls": False}, "http://[::ffff:10.0.0.1]:8080/x.png",
         "(IPv4 10.0.0.1, a private address): set FREESEG_ALLOW_PRIVATE_URLS=true"),
        ({"allow_private_urls": True, "allowed_url_hosts": ("images.example.com",)}, "{other}/img.png",
         "host 127.0.0.1 is not in FREESEG_ALLOWED_URL_HOSTS"),
    ],
    ids=["loopback", "link-local", "private-in-ipv6", "not-allowed-host"],
)
def test_refused_hosts_are_never_asked_and_the_error_names_the_setting(
    tiny_settings, tiny_segmenter, label_studio, other, caplog, update, url, error
):
    """Label Studio's own address is fetched whatever the policy; the refused task alone gets no result."""
    caplog.set_level(logging.WARNING, logger="backend.server.predictions")
    settings = tiny_settings.model_copy(update={"label_studio_url": label_studio.url, **update})
    with running(settings, tiny_segmenter) as client:
        tasks = image_tasks(url.format(other=other.url), "/data/upload/cat.png", first_id=0)
        results = predictions(client, tasks, CONFIG)

    assert results[0]["result"] == [] and results[1]["result"]
    assert other.requests == [] and len(label_studio.requests) == 1
    [refusal] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task 0:")]
    assert error in refusal


# --- no pickle ------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


@dataclass(frozen=True)
class Finding:
    where: str
    what: str


def _rq_objects(tree: ast.Module) -> dict[str, object]:
    """Local names bound to RQ modules, classes and functions by this source's imports."""
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "rq":
                    names[alias.asname or alias.name.split(".")[0]] = importlib.import_module(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rq":
            module = importlib.import_module(node.module)
            for alias in node.names:
                names[alias.asname or alias.name] = getattr(module, alias.name, None)
    return names


def _resolve(node: ast.expr, objects: dict[str, object]) -> object | None:
    """The object an expression like ``Job.fetch`` or ``rq.Queue`` names, when it starts from ``objects``."""
    if isinstance(node, ast.Name):
        return objects.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, objects)
        return getattr(base, node.attr, None) if base is not None else None
    return None


def _takes_serializer(thing: object) -> bool:
    try:
        return callable(thing) and "serializer" in inspect.signature(thing).parameters
    except (TypeError, ValueError):
        return False


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((keyword.value for keyword in call.keywords if keyword.arg == name), None)


def _is_constant(node: ast.expr | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_deserialization(source: str, where: str) -> list[Finding]:
    """Every way this source could unpickle: pickle-based modules, ``torch.load`` without
    ``weights_only=True``, ``allow_pickle=True``, ``read_pickle``, and RQ queues, workers and
    job look-ups without an explicit ``serializer`` (RQ's default serializer is pickle)."""
    tree = ast.parse(source)
    rq = _rq_objects(tree)
    findings = []

    def flag(node: ast.AST, what: str) -> None:
        findings.append(Finding(f"{where}:{node.lineno}", what))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    flag(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            flag(node, f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            callee = ast.unparse(node.func)
            if callee.endswith("torch.load") and not _is_constant(_keyword(node, "weights_only"), True):
                flag(node, f"{callee}() without weights_only=True")
            allow_pickle = _keyword(node, "allow_pickle")
            if allow_pickle is not None and not _is_constant(allow_pickle, False):
                flag(node, f"{callee}(allow_pickle=...)")
            if callee.split(".")[-1] == "read_pickle":
                flag(node, f"{callee}()")
            if _takes_serializer(_resolve(node.func, rq)) and _keyword(node, "serializer") is None:
                flag(node, f"RQ {callee}() without serializer=")
        elif isinstance(node, ast.ClassDef) and any(_takes_serializer(_resolve(base, rq)) for base in node.bases):
            inits = [call for call in ast.walk(node) if isinstance(call, ast.Call) and ast.unparse(call.func) == "super().__init__"]
            if not inits or any(_keyword(call, "serializer") is None for call in inits):
                flag(node, f"subclass {node.name} of an RQ class without serializer= in super().__init__()")
    return findings


def test_the_scanner_finds_each_way_to_unpickle():
    source = """
import pickle, numpy as np, torch, pandas as pd
from joblib import load
import rq
from rq import Queue, SimpleWorker
from rq.job import Job
pickle.loads(b"")
torch.load("w.pt")
torch.load("w.pt", weights_only=False)
np.load("a.npy", allow_pickle=True)
pd.read_pickle("x")
Queue("q", connection=c)
rq.Worker([q], connection=c)
Job.fetch("id", connection=c)
class Mine(SimpleWorker):
    def __init__(self, queues):
        super().__init__(queues)
"""
    found = [finding.what for finding in unsafe_deserialization(source, "sample.py")]
    assert sorted(found) == sorted([
        "import pickle", "from joblib import ...", "torch.load() without weights_only=True",
        "torch.load() without weights_only=True", "np.load(allow_pickle=...)", "pd.read_pickle()",
        "RQ Queue() without serializer=", "RQ rq.Worker() without serializer=", "RQ Job.fetch() without serializer=",
        "subclass Mine of an RQ class without serializer= in super().__init__()",
    ])
    safe = """
import numpy as np, torch
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer
torch.load("w.pt", weights_only=True)
np.load("a.npy")
Queue("q", connection=c, serializer=JSONSerializer)
Job.fetch_many(ids, connection=c, serializer=JSONSerializer)
Job.key_for("id")
class Mine(SimpleWorker):
    def __init__(self, queues):
        super().__init__(queues, serializer=JSONSerializer)
"""
    assert unsafe_deserialization(safe, "safe.py") == []


def test_nothing_in_the_backend_can_unpickle():
    root = Path(backend.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) > 20
    findings = [finding for path in sources
                for finding in unsafe_deserialization(path.read_text(), str(path.relative_to(root.parent)))]
    assert findings == []


# --- secrets in logs ------------------------------------------------------------------------

SECRETS = {
    "LABEL_STUDIO_API_KEY": TOKEN,
    "BASIC_AUTH_PASS": "basic-pass-secret",
    "a wrong basic auth password": "wrong-pass-secret",
    "the Redis password": "redis-pass-secret",
    "/setup's access_token": "setup-token-secret",
    "/predict's params.password": "task-data-password-secret",
    "a password in an image URL": "url-password-secret",
}
PRESIGNED_QUERY = "X-Amz-Signature=presigned-secret"


def provoke_failures(client: TestClient, label_studio: RecordingServer, other: RecordingServer, closed: str) -> list[dict]:
    """Every request that carries or could log a secret; the /predict results."""
    auth = ("labeller", SECRETS["BASIC_AUTH_PASS"])
    setup = {"project": "1.1", "schema": CONFIG, "hostname": label_studio.url,
             "access_token": SECRETS["/setup's access_token"]}
    assert client.post("/setup", auth=auth, json=setup).status_code == 200
    urls = ["/data/upload/cat.png", f"{other.url}/img.png", f"http://{closed}/x.png?{PRESIGNED_QUERY}",
            f"http://user:{SECRETS['a password in an image URL']}@{closed}/y.png"]
    tasks = image_tasks(*urls, first_id=0)
    params = {"login": "me", "password": SECRETS["/predict's params.password"]}
    results = predict(client, tasks, CONFIG, params=params, auth=auth).json()["results"]
    webhook = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 1, "task": 5, "result": []}}
    assert client.post("/webhook", auth=auth, json=webhook).status_code == 200
    wrong = ("labeller", SECRETS["a wrong basic auth password"])
    assert predict(client, tasks, CONFIG, params=params, auth=wrong).status_code == 401
    return results


def test_secrets_never_appear_in_logs(tiny_settings, tiny_segmenter, label_studio, other, caplog):
    """Failures that log: Label Studio refusing the token, Redis down, downloads failing, a wrong password."""
    for logger in ("", "backend", "urllib3", "requests", "redis", "httpx", "fastapi", "uvicorn"):
        caplog.set_level(logging.DEBUG, logger=logger)
    label_studio.routes["/data/upload/cat.png"] = lambda handler: send(handler, 401, b"no")
    label_studio.routes["/api/predictions/"] = lambda handler: send(handler, 401, b"no")
    redis_port = free_port()  # nothing listens there
    redis_url = f"redis://:{SECRETS['the Redis password']}@127.0.0.1:{redis_port}/0"
    settings = tiny_settings.model_copy(update={
        "label_studio_url": label_studio.url, "label_studio_api_key": TOKEN, "basic_auth_user": "labeller",
        "basic_auth_pass": SECRETS["BASIC_AUTH_PASS"], "redis_url": redis_url, "cache_retry_after_seconds": 0.01,
    })
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    with running(settings, tiny_segmenter) as client:
        results = provoke_failures(client, label_studio, other, closed)

    assert [bool(result["result"]) for result in results] == [False, True, False, False]
    logged = caplog.text + "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for provoked in ("HTTP 401", "feature cache", f"redis://127.0.0.1:{redis_port}/0",
                     "feedback for task 5 skipped", f"http://{closed}/x.png"):
        assert provoked in logged, f"{provoked!r} was not logged: the failure was not provoked"
    for name, secret in SECRETS.items():
        assert secret not in logged, f"{name} appears in the log"
    # urllib3 logs request paths at DEBUG; `freesegdiff serve` leaves its loggers at WARNING.
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("urllib3"))
    assert PRESIGNED_QUERY not in ours
