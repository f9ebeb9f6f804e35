"""One Label Studio project's tasks and predictions, through label-studio-sdk.

The SDK's own retries are turned off (``max_retries=0``) so that every retry is ours:
bounded, logged, and the same for API calls and image downloads. Each method is one
attempt, except ``task_ids``, which retries each page; callers wrap the others in
``with_backoff``, writes together with the check that precedes them. The SDK sends a
legacy token as ``Token`` and exchanges a personal access token (a JWT) for a ``Bearer`` one.
"""

from __future__ import annotations

from label_studio_sdk import LabelStudio

from backend.jobs.backoff import Backoff, with_backoff
from backend.labelstudio.images import LabelStudioAccess

API_TIMEOUT_SECONDS = 30.0
PAGE_SIZE = 100


class LabelStudioProject:
    """Project ``project`` on the Label Studio of ``access``."""

    def __init__(self, access: LabelStudioAccess, project: int, backoff: Backoff) -> None:
        if not access.url or not access.api_key:
            raise ValueError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or --url and --api-key)")
        self.access, self.project, self.backoff = access, project, backoff
        self.client = LabelStudio(base_url=access.url.rstrip("/"), api_key=access.api_key,
                                  timeout=API_TIMEOUT_SECONDS, max_retries=0)

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
        """The task's ``id`` and ``data`` (as the image helpers take them) and its predictions' ``model_versions``."""
        task = self.client.tasks.get(id=str(task_id))
        return {"id": task.id, "data": task.data,
                "model_versions": [prediction.model_version for prediction in task.predictions or []]}

    def prediction_ids(self, task_id: int, model_version: str) -> list[int]:
        """The ids of the task's predictions of ``model_version`` (other versions are not ours to touch)."""
        return [p.id for p in self.client.predictions.list(task=task_id) if p.model_version == model_version]

    def create_prediction(self, task_id: int, prediction: dict) -> None:
        self.client.predictions.create(task=task_id, result=prediction["result"], score=prediction["score"],
                                       model_version=prediction["model_version"])

    def delete_prediction(self, prediction_id: int) -> None:
        self.client.predictions.delete(id=prediction_id)
