"""The one client of Label Studio's API: label-studio-sdk's, with our retries.

Everything the backend asks Label Studio (a project's tasks and label config, predictions,
annotations) goes through ``LabelStudioClient``; image downloads are ``labelstudio.images``'s.

The SDK's own retries are turned off (``max_retries=0``) so that every retry is ours:
bounded, logged, and the same for API calls and image downloads. Each method is one
attempt, except ``task_ids``, which retries each page; callers wrap the others in
``with_backoff``, writes together with the check that precedes them. The SDK sends a
legacy token as ``Token`` and exchanges a personal access token (a JWT) for a ``Bearer`` one.
Annotations and predictions come back as the JSON Label Studio sent (times as ISO 8601
strings, not the SDK's datetimes), so that what is kept of them can be written as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.backoff import Backoff, with_backoff

API_TIMEOUT_SECONDS = 30.0
PAGE_SIZE = 100
MODEL_VERSION_PREFIX = "freesegdiff-"  # every model_version of ours starts so (backend.models.identity)


class LabelStudioClient:
    """The Label Studio of ``access``; each call is one attempt unless it says otherwise."""

    def __init__(self, access: LabelStudioAccess, backoff: Backoff) -> None:
        if not access.url or not access.api_key:
            raise ValueError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or --url and --api-key)")
        self.access, self.backoff = access, backoff
        self.client = LabelStudio(base_url=access.url.rstrip("/"), api_key=access.api_key,
                                  timeout=API_TIMEOUT_SECONDS, max_retries=0)

    def annotation(self, annotation_id: int) -> dict:
        """The annotation as Label Studio holds it (``id``, ``task``, ``result``, ...)."""
        return self.client.annotations.get(id=annotation_id).model_dump(mode="json")

    def our_prediction(self, task_id: int, parent_prediction: int | None) -> dict | None:
        """The prediction of this backend an annotation started from, else this backend's latest for the task."""
        if parent_prediction:
            prediction = self.client.predictions.get(id=parent_prediction).model_dump(mode="json")
            if str(prediction.get("model_version") or "").startswith(MODEL_VERSION_PREFIX):
                return prediction
        listed = [p.model_dump(mode="json") for p in self.client.predictions.list(task=task_id)]
        ours = [p for p in listed if str(p.get("model_version") or "").startswith(MODEL_VERSION_PREFIX)]
        return max(ours, key=lambda p: p.get("id") or 0) if ours else None


class LabelStudioProject(LabelStudioClient):
    """Project ``project`` on the Label Studio of ``access``."""

    def __init__(self, access: LabelStudioAccess, project: int, backoff: Backoff) -> None:
        super().__init__(access, backoff)
        self.project = project

    def label_config(self) -> str:
        return self.client.projects.get(id=self.project).label_config or ""

    def task_ids(self) -> list[int]:
        """Every task id of the project, page by page (each page with backoff), in Label Studio's order."""
        ids: list[int] = []
        page = 1
        while True:
            listed = with_backoff(
                lambda page=page: self.client.tasks.list(project=self.project, page=page, page_size=PAGE_SIZE,
                                                         fields="task_only", include="id"),
                f"listing tasks of project {self.project} (page {page})", self.backoff)
            ids.extend(task.id for task in listed.items)
            total = listed.response.total if listed.response is not None else None
            if not listed.items or total is None or len(ids) >= total:
                return ids
            page += 1

    def task(self, task_id: int) -> dict:
        """One task as ``tasks`` reads it; ``ApiError`` 404 when the project does not hold it."""
        found = self.tasks([task_id])
        if not found:
            raise ApiError(status_code=404, body={"detail": f"task {task_id} is not in project {self.project}"})
        return found[0]

    def tasks(self, task_ids: Sequence[int]) -> list[dict]:
        """The tasks of ``task_ids`` the project holds: each one's ``id``, ``project`` and ``data`` (as the image
        helpers take them) and its predictions' ``model_versions``; one attempt.

        Read through the task list filtered by ids, never ``GET /api/tasks/{id}``: that one makes Label Studio
        call the connected backend's /predict for a task without a prediction (``show_collab_predictions``, on
        by default), so a run reading its tasks would have the server predict them one by one first.
        """
        query = json.dumps({"selectedItems": {"all": False, "included": [int(task_id) for task_id in task_ids]}})
        listed = self.client.tasks.list(project=self.project, query=query, fields="all",
                                        page_size=max(len(task_ids), 1)).items
        return [{"id": task["id"], "project": task.get("project"), "data": task.get("data"),
                 "model_versions": [prediction.get("model_version") for prediction in task.get("predictions") or []]}
                for task in (item.model_dump(mode="json") for item in listed)]

    def annotations(self, task_id: int) -> list[dict]:
        """The task's annotations as Label Studio holds them."""
        return [annotation.model_dump(mode="json") for annotation in self.client.annotations.list(id=task_id)]

    def prediction_ids(self, task_id: int, model_version: str) -> list[int]:
        """The ids of the task's predictions of ``model_version`` (other versions are not ours to touch)."""
        return [p.id for p in self.client.predictions.list(task=task_id) if p.model_version == model_version]

    def create_prediction(self, task_id: int, prediction: dict) -> None:
        self.client.predictions.create(task=task_id, result=prediction["result"], score=prediction["score"],
                                       model_version=prediction["model_version"])

    def delete_prediction(self, prediction_id: int) -> None:
        self.client.predictions.delete(id=prediction_id)

    def our_ml_backends(self) -> list[dict]:
        """The project's connections to this backend (the ``model_version`` /setup answered is ours): each one's
        ``id`` and ``extra_params``."""
        return [{"id": backend.id, "extra_params": backend.extra_params}
                for backend in self.client.ml.list(project=self.project)
                if str(backend.model_version or "").startswith(MODEL_VERSION_PREFIX)]
