"""A loopback stand-in for the part of Label Studio's API that learning reads.

It answers what label-studio-sdk asks: ``/api/annotations/<id>/``, ``/api/tasks/<id>/``,
``/api/tasks/<id>/annotations/``, ``/api/tasks/?project=`` (with a ``query`` selecting ids), ``/api/projects/<id>/``,
``/api/predictions/<id>/``, ``/api/predictions/?task=`` and ``/api/ml?project=``, from dicts the test edits
(deleting an annotation, a task or a project makes it answer 404), and only to ``TOKEN``.
A task's ``predictions`` are those of ``predictions`` whose ``task`` is its id.
"""

from __future__ import annotations

import base64
import json
import re
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from tests.http_server import RecordingServer, send

TOKEN = "learning-token"
UPDATED_AT = "2026-12-03T09:00:00.000000Z"  # Label Studio's form: microseconds and Z


def data_uri(image: np.ndarray) -> str:
    """A PNG ``data:`` URI of an (H, W, 3) RGB image, as a task's ``data.image``."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()


def polygon(label: str, points: list[tuple[float, float]], from_name: str = "tag") -> dict:
    """A ``polygonlabels`` result with points in percent."""
    return {"type": "polygonlabels", "from_name": from_name, "to_name": "image",
            "value": {"points": [list(p) for p in points], "polygonlabels": [label]}}


class FakeLabelStudio:
    """Projects, tasks and annotations by id; ``url`` while started."""

    def __init__(self) -> None:
        self.projects: dict[int, str] = {}  # id -> label config
        self.tasks: dict[int, dict] = {}  # id -> {"project": id, "data": {...}}
        self.annotations: dict[int, dict] = {}  # id -> {"task": id, "result": [...]}
        self.predictions: dict[int, dict] = {}  # id -> {"task": id, "result": [...], "model_version": ...}
        self.ml_backends: dict[int, dict] = {}  # id -> {"project": id, "extra_params": {...}, "model_version": ...}
        self._server = RecordingServer(fallback=self._answer)
        self.url = self._server.url

    @property
    def requests(self) -> list[str]:
        """The path (with its query) of every request so far."""
        return [request.path for request in self._server.requests]

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.headers.get("Authorization") != f"Token {TOKEN}":
            status, body = 401, {"detail": "no token"}
        else:
            status, body = self.answer(handler.path)
        send(handler, status, json.dumps(body).encode(), {"content-type": "application/json"})

    def answer(self, path: str) -> tuple[int, object]:
        split = urlsplit(path)
        query = parse_qs(split.query)
        if match := re.fullmatch(r"/api/annotations/(\d+)/?", split.path):
            annotation = self.annotations.get(int(match[1]))
            return (200, self._annotation(int(match[1]), annotation)) if annotation \
                else (404, {"detail": "Not found."})
        if match := re.fullmatch(r"/api/tasks/(\d+)/annotations/?", split.path):
            task = int(match[1])
            return 200, [self._annotation(i, a) for i, a in self.annotations.items() if a["task"] == task]
        if match := re.fullmatch(r"/api/tasks/(\d+)/?", split.path):
            task = self.tasks.get(int(match[1]))
            return (200, {"id": int(match[1]), "predictions": self._predictions(int(match[1])), **task}) if task \
                else (404, {"detail": "Not found."})
        if match := re.fullmatch(r"/api/predictions/(\d+)/?", split.path):
            prediction = self.predictions.get(int(match[1]))
            return (200, {"id": int(match[1]), **prediction}) if prediction else (404, {"detail": "Not found."})
        if split.path.rstrip("/") == "/api/predictions":
            return 200, self._predictions(int(query["task"][0]))
        if split.path.rstrip("/") == "/api/tasks":
            project = int(query["project"][0])
            ids = [{"id": i} for i, t in self.tasks.items() if t["project"] == project]
            if "query" in query:  # the data manager's selection: whole tasks (fields=all), as 1.23.2 lists them
                included = json.loads(query["query"][0])["selectedItems"]["included"]
                ids = [{**item, "predictions": self._predictions(item["id"]), **self.tasks[item["id"]]}
                       for item in ids if item["id"] in included]
            page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
            return 200, {"tasks": ids[(page - 1) * size : page * size], "total": len(ids)}
        if split.path.rstrip("/") == "/api/ml":
            project = int(query["project"][0])
            return 200, [{"id": i, **b} for i, b in self.ml_backends.items() if b["project"] == project]
        if match := re.fullmatch(r"/api/projects/(\d+)/?", split.path):
            config = self.projects.get(int(match[1]))
            return (200, {"id": int(match[1]), "label_config": config}) if config else (404, {"detail": "Not found."})
        return 404, {"detail": "Not found."}

    @staticmethod
    def _annotation(annotation_id: int, annotation: dict) -> dict:
        """The annotation as Label Studio answers it: with its ``updated_at`` (a test may set its own)."""
        return {"id": annotation_id, "updated_at": UPDATED_AT, **annotation}

    def _predictions(self, task: int) -> list[dict]:
        return [{"id": i, **p} for i, p in self.predictions.items() if p["task"] == task]

    def __enter__(self) -> FakeLabelStudio:
        self._server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.__exit__(*exc)
