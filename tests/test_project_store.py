"""What /setup says of a project reaches every process and survives a restart (the project store).

The multi-process test runs a real `freesegdiff serve` with WORKERS=2 and no LABEL_STUDIO_URL
against two loopback stand-ins for Label Studio, each serving its project's upload only to its
own token: every prediction must find its project's host, token and options, before and after
a restart, and never another project's.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests
from sklearn.datasets import load_sample_image

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.projects import ProjectSetup, ProjectStore, project_id
from backend.storage.shared_store import FileStore, RedisStore, StoreError
from tests.app_client import image_tasks, predict_body
from tests.http_server import RecordingServer, send
from tests.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="Sky"/><Label value="Roof"/><Label value="Tree"/></BrushLabels></View>')
UPLOAD = "/data/upload/7/china.jpg"


@pytest.mark.parametrize(("given", "expected"), [("12.1700000000", "12"), ("12", "12"), (12, "12"),
                                                 ({"id": 12, "title": "x"}, "12"), (None, None), ("", None),
                                                 ("../x", None), ({"title": "x"}, None), (True, None)])
def test_every_form_of_project_gives_one_id(given: object, expected: str | None) -> None:
    assert project_id(given) == expected


def test_a_setup_keeps_its_token_out_of_repr() -> None:
    setup = ProjectSetup(CONFIG, {"k": 5}, LabelStudioAccess("http://ls:8080", "s3cr3t-token"))
    assert "s3cr3t-token" not in repr(setup)
    assert ProjectSetup.from_json(setup.to_json()) == setup


def test_the_file_store_keeps_projects_apart_readable_only_by_their_owner(tmp_path: Path) -> None:
    projects = ProjectStore(FileStore(tmp_path))
    first = ProjectSetup(CONFIG, {"k": 2}, LabelStudioAccess("http://a:8080", "token-a"))
    second = ProjectSetup(None, {"use_caption": False}, LabelStudioAccess("http://b:8080", "token-b"))
    projects.save("1.111", first)
    projects.save({"id": 2}, second)
    assert projects.load({"id": 1}) == first and projects.load("2.999") == second
    assert projects.load(3) == ProjectSetup()
    path = tmp_path / "projects" / "1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["1", "2"]  # no temporary file left behind


def test_the_redis_store_is_shared_and_an_outage_reads_as_no_setup(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        setup = ProjectSetup(CONFIG, {"k": 3}, LabelStudioAccess("http://a:8080", "token-a"))
        ProjectStore(RedisStore(server.url)).save("4.1", setup)
        assert ProjectStore(RedisStore(server.url)).load({"id": 4}) == setup  # another process's view
        with server.client() as client:
            assert client.exists("freeseg:projects:4")
    finally:
        server.stop()
    assert ProjectStore(RedisStore(server.url, timeout_seconds=0.5)).load(4) == ProjectSetup()
    with pytest.raises(StoreError, match="REDIS_URL"):
        ProjectStore(RedisStore(server.url, timeout_seconds=0.5)).save(4, setup)


def _serve_one_upload(server: RecordingServer, token: str, image: bytes) -> None:
    """The server stands in for Label Studio: one upload, only to requests carrying ``token``."""

    def upload(handler: BaseHTTPRequestHandler) -> None:
        allowed = handler.path == UPLOAD and handler.headers.get("Authorization") == f"Token {token}"
        send(handler, 200 if allowed else 401, image if allowed else b"")

    server.fallback = upload


def _asked(server: RecordingServer) -> list[tuple[str, str | None]]:
    """(path, Authorization) of each request the server got."""
    return [(request.path, request.headers.get("Authorization")) for request in server.requests]


def _start(port: int, model_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "FREESEG_MODELS": "tiny", "FREESEG_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "MODEL_DIR": str(model_dir), "WORKERS": "2", "FREESEG_CRF_PROCESSES": "0", "OMP_NUM_THREADS": "1",
           "LOG_LEVEL": "WARNING"}
    env.pop("LABEL_STUDIO_URL", None)
    env.pop("REDIS_URL", None)
    command = [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("a") as output:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _post(base: str, path: str, body: dict, seconds: float = 240) -> dict:
    """POST, waiting out the 503s of a process whose models are still loading."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            response = requests.post(base + path, json=body, timeout=120)
            if response.status_code != 503 or time.monotonic() > deadline:
                assert response.status_code == 200, response.text
                return response.json()
        except requests.ConnectionError:  # not listening yet
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _predictions(base: str) -> dict[str, list[list[dict]]]:
    """Six predictions of the same uploaded image per project, alternating, without any /setup."""
    answers: dict[str, list[list[dict]]] = {"1.111": [], "2.222": []}
    for _ in range(6):
        for project in answers:
            body = predict_body(image_tasks(UPLOAD, first_id=7), CONFIG, project)
            answers[project].append(_post(base, "/predict", body)["results"][0]["result"])
    return answers


@pytest.mark.slow
def test_every_process_uses_what_setup_said_before_and_after_a_restart(tmp_path: Path, tiny_settings) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")).save(buffer, "JPEG", quality=90)
    port, log = free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with RecordingServer() as first, RecordingServer() as second:
        _serve_one_upload(first, "token-a", buffer.getvalue())
        _serve_one_upload(second, "token-b", buffer.getvalue())
        process = _start(port, tiny_settings.model_dir, log)
        try:
            _post(base, "/setup", {"project": "1.111", "schema": CONFIG, "hostname": first.url,
                                   "access_token": "token-a", "extra_params": {"k": 2, "use_caption": False,
                                                                                "refine": "none"}})
            _post(base, "/setup", {"project": "2.222", "schema": CONFIG, "hostname": second.url,
                                   "access_token": "token-b", "extra_params": {"k": 3, "use_caption": False,
                                                                                "refine": "none"}})
            before = _predictions(base)
            _stop(process)
            process = _start(port, tiny_settings.model_dir, log)
            after = _predictions(base)
        finally:
            _stop(process)
    # Each stand-in was asked only by its own project, always with its own token: 6 times per run.
    assert _asked(first) == [(UPLOAD, "Token token-a")] * 12
    assert _asked(second) == [(UPLOAD, "Token token-b")] * 12
    for project, k in (("1.111", 2), ("2.222", 3)):
        results = before[project] + after[project]
        assert all(0 < len(result) <= k for result in results), [len(r) for r in results]  # the project's K
        assert all(result == results[0] for result in results)  # any process, before or after the restart
