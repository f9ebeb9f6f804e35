"""The few Label Studio API calls the backend itself makes (beyond downloading images)."""

from __future__ import annotations

import requests

from backend.labelstudio.images import LabelStudioAccess, authorization_header, plain_session

MODEL_VERSION_PREFIX = "freesegdiff-"
API_TIMEOUT = 10.0


class LabelStudioApiError(RuntimeError):
    """Label Studio could not be asked; the message says which call and why (no token)."""


def _get(access: LabelStudioAccess, path: str, params: dict | None = None) -> object:
    if not access.url:
        raise LabelStudioApiError(f"GET {path}: LABEL_STUDIO_URL is not set")
    headers = {"Authorization": authorization_header(access.api_key)} if access.api_key else {}
    try:
        with plain_session() as session:  # no ~/.netrc password in place of the token
            response = session.get(access.url.rstrip("/") + path, params=params, headers=headers, timeout=API_TIMEOUT)
    except requests.RequestException as error:
        raise LabelStudioApiError(f"GET {path}: {type(error).__name__}") from None
    if not response.ok:
        raise LabelStudioApiError(f"GET {path}: HTTP {response.status_code}")
    return response.json()


def our_prediction(access: LabelStudioAccess, task_id: int, parent_prediction: int | None) -> dict | None:
    """The prediction of this backend an annotation started from, else this backend's latest for the task."""
    if parent_prediction:
        prediction = _get(access, f"/api/predictions/{parent_prediction}")
        if str(prediction.get("model_version", "")).startswith(MODEL_VERSION_PREFIX):
            return prediction
    listed = _get(access, "/api/predictions/", {"task": task_id})
    ours = [p for p in listed if str(p.get("model_version", "")).startswith(MODEL_VERSION_PREFIX)]
    return max(ours, key=lambda p: p.get("id", 0)) if ours else None
