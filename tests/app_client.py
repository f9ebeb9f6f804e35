"""The app in-process once its models are ready: where the server's tests start."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from backend.pipeline.segmenter import Segmenter
from backend.server.app import create_app
from backend.settings import Settings


def wait_until_ready(client: TestClient, seconds: float = 60) -> None:
    """Until /health says the models are ready (they load in the background); fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while client.get("/health").json()["model_state"] != "ready":
        assert time.monotonic() < deadline, "models did not become ready"
        time.sleep(0.05)


@contextmanager
def ready_client(settings: Settings, load_segmenter: Callable[[], Segmenter]) -> Iterator[TestClient]:
    """A client of the app with these settings and models, started and ready."""
    with TestClient(create_app(settings, load_segmenter=load_segmenter)) as client:
        wait_until_ready(client)
        yield client
