"""The app in-process once its models are ready, and /predict's bodies: where the server's tests start."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
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


def image_tasks(*urls: str, first_id: int = 1) -> list[dict]:
    """Label Studio tasks, one per image URL, numbered from ``first_id``."""
    return [{"id": first_id + index, "data": {"image": url}} for index, url in enumerate(urls)]


def predict_body(tasks: list[dict], label_config: str | None = None, project: str | None = None,
                 params: dict | None = None) -> dict:
    """A /predict body; without ``label_config`` the server uses the project's from /setup."""
    body = {"tasks": tasks, "label_config": label_config, "project": project, "params": params}
    return {key: value for key, value in body.items() if value is not None}


def predict(client: TestClient | str, tasks: list[dict], label_config: str | None = None, *,
            project: str | None = None, params: dict | None = None, **post: Any) -> httpx.Response:
    """POST /predict to the app, or to the server at a base URL; ``post`` goes to the client (auth, timeout)."""
    body = predict_body(tasks, label_config, project, params)
    if isinstance(client, str):
        return httpx.post(f"{client}/predict", json=body, **post)
    return client.post("/predict", json=body, **post)


def predictions(client: TestClient | str, tasks: list[dict], label_config: str | None = None,
                **options: Any) -> list[dict]:
    """The results of a /predict that must succeed (``options`` as :func:`predict`'s)."""
    response = predict(client, tasks, label_config, **options)
    assert response.status_code == 200, response.text
    return response.json()["results"]
