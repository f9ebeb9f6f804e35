"""The work of one /predict is bounded: it stops when its client disconnects, at its deadline, and at SIGTERM.

A real ``freesegdiff serve`` (the tiny profile) where it is the process's behaviour (a client closing
its socket, SIGTERM), the app in-process for the deadline. Each task's image is a different picture,
so that no task is served from the feature cache another one filled.
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.settings import Settings
from tests.http_server import RecordingServer, send
from tests.redis_server import free_port
from tests.app_client import image_tasks, predict, predict_body, ready_client

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Sky"/><Label value="Tree"/></BrushLabels></View>"""
ABANDONED_TASKS = 30  # on main the worker took about 1.4 s for each on a 2-core runner: far more than one task
STARTED_IMAGES = 3  # the request is abandoned once its second batch (of FREESEG_MAX_BATCH=2) is being loaded


class PictureHost:
    """Serves /<n>.png: china.jpg with its first row set to n, so each is a distinct picture; counts requests."""

    def __init__(self, server: RecordingServer, china: np.ndarray):
        server.fallback = self._answer
        self.url = server.url
        self.china, self.served, self.lock = china, 0, threading.Lock()
        self.enough = threading.Event()
        self.wanted = STARTED_IMAGES

    def picture(self, number: int) -> bytes:
        pixels = self.china.copy()
        pixels[0, :, :] = number % 256
        pixels[1, :, :] = number // 256 % 256
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
        return out.getvalue()

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        send(handler, 200, self.picture(int(handler.path.strip("/").split(".")[0])), {"Content-Type": "image/png"})
        self.count()

    def count(self) -> None:
        with self.lock:
            self.served += 1
            if self.served >= self.wanted:
                self.enough.set()

    def expect(self, more: int) -> None:
        """``enough`` is set once ``more`` further pictures have been served."""
        with self.lock:
            self.enough.clear()
            self.wanted = self.served + more


@pytest.fixture()
def pictures(china: np.ndarray, http_server: RecordingServer) -> PictureHost:
    return PictureHost(http_server, china)


def _tasks(host: PictureHost, numbers: range) -> list[dict]:
    """Task n shows picture n."""
    return image_tasks(*(f"{host.url}/{n}.png" for n in numbers), first_id=numbers.start)


class _Server:
    """``freesegdiff serve`` on the tiny profile in a child process."""

    def __init__(self, model_dir: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "FREESEG_MODELS": "tiny", "FREESEG_DEVICE": "cpu", "MODEL_DIR": str(model_dir),
                       "HF_HUB_OFFLINE": "1", "FREESEG_ALLOW_PRIVATE_URLS": "true", "LOG_LEVEL": "WARNING",
                       "FREESEG_MAX_BATCH": "2", **env}
        self.process = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1",
                                         "--port", str(self.port)], env=environment, cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while True:
            assert self.process.poll() is None, "the server exited while starting"
            try:
                if httpx.get(f"{self.url}/health", timeout=5).json()["model_state"] == "ready":
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server was not ready within 180 s"
            time.sleep(0.2)

    def timed_predict(self, tasks: list[dict], timeout: float) -> tuple[float, httpx.Response]:
        start = time.monotonic()
        response = predict(self.url, tasks, CONFIG, timeout=timeout)
        return time.monotonic() - start, response

    def send_predict(self, tasks: list[dict]) -> socket.socket:
        """A /predict sent on a raw socket whose answer is never read: close the socket to abandon it."""
        body = json.dumps(predict_body(tasks, CONFIG)).encode()
        connection = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return connection

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def test_an_abandoned_request_frees_the_worker_for_the_next_one(tiny_settings, pictures, pytestconfig):
    server = _Server(tiny_settings.model_dir)
    try:
        server.timed_predict(_tasks(pictures, range(1000, 1001)), timeout=120)  # warm-up
        single, _ = server.timed_predict(_tasks(pictures, range(1001, 1002)), timeout=120)
        pictures.expect(STARTED_IMAGES)
        abandoned = server.send_predict(_tasks(pictures, range(ABANDONED_TASKS)))
        assert pictures.enough.wait(120), "the abandoned request never started"
        abandoned.close()
        after, response = server.timed_predict(_tasks(pictures, range(2000, 2001)), timeout=300)
        with pytestconfig.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print(f"\none task: {single:.1f} s; one task after a {ABANDONED_TASKS}-task request abandoned "
                  f"after {STARTED_IMAGES} images: {after:.1f} s")
        assert response.status_code == 200
        assert after < 3 * single + 5, f"{after:.1f} s, one task alone {single:.1f} s: the abandoned work went on"
    finally:
        server.stop()


def test_sigterm_stops_the_server_soon_while_a_long_request_runs(tiny_settings, pictures):
    server = _Server(tiny_settings.model_dir, FREESEG_SHUTDOWN_GRACE_SECONDS="2")
    try:
        pictures.expect(STARTED_IMAGES)
        running = server.send_predict(_tasks(pictures, range(3000, 3000 + ABANDONED_TASKS)))
        assert pictures.enough.wait(120), "the request never started"
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(30)  # the grace, the batch on the model, the worker's stop
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {time.monotonic() - start:.0f} s after SIGTERM")
        running.close()
    finally:
        server.stop()


def test_the_deadline_cancels_the_remaining_tasks_and_frees_the_worker(tiny_segmenter, tmp_path, pictures):
    """The first batch's encode is held until the deadline has answered; the other tasks never reach the model."""
    released, encoded = threading.Event(), []

    def slowed():
        segmenter = copy.copy(tiny_segmenter)

        def encode_batch(images):
            encoded.append(len(images))
            released.wait(60)
            return tiny_segmenter.encode_batch(images)

        segmenter.encode_batch = encode_batch
        return segmenter

    settings = Settings(models="tiny", device="cpu", model_dir=tmp_path, allow_private_urls=True, max_batch=1,
                        predict_deadline_seconds=10)
    with ready_client(settings, slowed) as client:
        response = predict(client, _tasks(pictures, range(3)), CONFIG)
        released.set()
        assert response.status_code == 504
        assert response.json()["kind"] == "predict_deadline"
        assert "FREESEG_PREDICT_DEADLINE_SECONDS" in response.json()["error"]
        after = predict(client, _tasks(pictures, range(10, 11)), CONFIG)
        assert after.status_code == 200 and after.json()["results"][0]["result"] is not None
        assert encoded == [1, 1]  # the timed-out request's first image, then the next request's: nothing else
        assert client.app.state.worker.depth == 0
