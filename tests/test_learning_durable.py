"""Learning that outlives a stalled store, a flood of forged webhooks and an oversized annotation.

The store is a real redis-server, stopped with SIGSTOP (it accepts connections and never answers);
the server is the app served over loopback HTTP by uvicorn; Label Studio is the loopback stand-in
``tests.fake_labelstudio``. A killed server's events: tests/test_learning_restart.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import requests
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from backend.pipeline.segmenter import Segmenter
from backend.server.app import create_app
from backend.settings import Settings
from tests.redis_server import free_port
from tests.test_annotations import _claiming_rle, brush
from tests.test_learning_server import CONFIG, Backend, _annotation, backend, fake, settings  # noqa: F401 (fixtures)


@contextmanager
def serving(settings: Settings, segmenter: Segmenter) -> Iterator[tuple[str, FastAPI]]:
    """The app on a loopback port, served by uvicorn in a thread (real HTTP: an answer is sent before its
    background tasks run), once its models are ready; the base URL and the app."""
    app = create_app(settings, load_segmenter=lambda: segmenter)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, 60)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(30)


def _wait_ready(base: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if requests.get(f"{base}/health", timeout=5).json()["model_state"] == "ready":
                return
        except requests.ConnectionError:  # not listening yet
            pass
        assert time.monotonic() < deadline, f"{base} did not become ready in {seconds} s"
        time.sleep(0.1)


def _timed_post(url: str, body: dict) -> tuple[requests.Response, float]:
    start = time.monotonic()
    answer = requests.post(url, json=body, timeout=30)
    return answer, time.monotonic() - start


def test_a_stalled_store_delays_neither_webhook_nor_setup_and_the_event_is_learned_after(
        settings, tiny_segmenter, start_redis):
    redis = start_redis()
    stalled = settings.model_copy(update={"redis_url": redis.url, "labelstudio_backoff_seconds": 0.2})
    with serving(stalled, tiny_segmenter) as (base, app):
        os.kill(redis.process.pid, signal.SIGSTOP)  # it accepts connections and never answers
        try:
            created = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, **_annotation(100, 10, [])}
            webhook, webhook_seconds = _timed_post(f"{base}/webhook", created)
            setup, setup_seconds = _timed_post(f"{base}/setup", {"project": "1.1700000000",
                                                                 "schema": CONFIG})
            time.sleep(3)  # the outage lasts a while: the learner meets the stalled store, not only the routes
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        assert webhook.status_code == 200 and webhook_seconds < 1.0, (webhook.status_code, webhook_seconds)
        assert setup.status_code == 200 and setup_seconds < 3.0, (setup.status_code, setup_seconds)
        app.state.learner.join(timeout=120)
        memory = app.state.memories.load("1", app.state.worker.fingerprint)
        assert memory is not None and list(memory.annotations) == ["100"]
        with redis.client() as client:
            assert client.keys("freeseg:learning:*") == []  # applied, so removed from the queue


def test_one_projects_flood_does_not_crowd_out_another_projects_event(settings, tiny_segmenter, fake):
    bounded = settings.model_copy(update={"learn_queue_size": 25, "learn_project_queue_size": 10,
                                          "learn_events_per_request": 10})
    released = threading.Event()
    answer = fake.answer

    def held(path: str) -> tuple[int, object]:  # Label Studio answers for the flood once it has all arrived
        if path.startswith("/api/annotations/50"):
            released.wait(60)
        return answer(path)

    fake.answer = held
    with TestClient(create_app(bounded, load_segmenter=lambda: tiny_segmenter)) as client:
        backend = Backend(client)
        # The forged request: 1,000 annotations at once. Refused whole, naming the setting.
        forged = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 2},
                                               "annotations": [{"id": 5000 + i} for i in range(1000)]})
        assert forged.status_code == 413, forged.text
        assert forged.json()["kind"] == "too_many_events" and "FREESEG_LEARN_EVENTS_PER_REQUEST" in forged.text
        # Requests within the limit, from project 2 only: more than the whole queue holds.
        for start in range(0, 30, 10):
            flood = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 2},
                                                  "annotations": [{"id": 5000 + start + i} for i in range(10)]})
            assert flood.status_code == 200
        real = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                             **_annotation(100, 10, [])})
        assert real.status_code == 200
        released.set()
        backend.state.learner.join(timeout=120)
        assert list(backend.memory(1).annotations) == ["100"]
        events = backend.learning_events()
        assert 'action="learn",outcome="done"} 1.0' in events
        assert 'action="forget",outcome="dropped"} 20.0' in events  # project 2's share, not project 1's event


def test_an_annotation_claiming_a_huge_brush_is_dropped_and_the_server_keeps_learning(backend, fake):
    huge = brush("rust", np.ones((2, 2), bool))
    huge.update(original_height=16384, original_width=16384)
    huge["value"]["rle"] = _claiming_rle(16384, 16384, 270_000)
    fake.annotations[300] = {"task": 11, "result": [huge]}
    backend.webhook("ANNOTATION_CREATED", 1, **_annotation(300, 11, []))
    assert backend.memory(1) is None
    assert 'action="learn",outcome="annotation_too_large"} 1.0' in backend.learning_events()
    backend.webhook("START_TRAINING", 1)  # the rebuild skips it and teaches the project's other annotations
    assert list(backend.memory(1).annotations) == ["100"]
    assert backend.client.get("/health").json()["status"] == "UP"


def test_with_label_studio_url_pinned_a_setup_naming_another_host_teaches_nothing_from_it(backend, fake, http_server):
    other = http_server  # someone else's "Label Studio", named by a forged /setup
    answer = backend.client.post("/setup", json={"project": "1.1700000000", "schema": CONFIG,
                                                 "hostname": other.url, "access_token": "forged"})
    assert answer.status_code == 200  # Label Studio's own /setup may name it by another address
    backend.webhook("ANNOTATION_CREATED", 1, **_annotation(100, 10, []))
    assert list(backend.memory(1).annotations) == ["100"]  # read from LABEL_STUDIO_URL
    assert other.requests == []
