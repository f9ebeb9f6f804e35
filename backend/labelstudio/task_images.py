"""A task's image: from the task's data to the URL, the bytes and the RGB array, one loader for all.

Task data holds an upload or local-files path on Label Studio, a cloud URI that Label
Studio presigns, a plain http(s) URL or a ``data:`` URI. This module knows those forms and
which origin is Label Studio's; the safe download itself (limits, deadline, redirects, URL
policy) is ``backend.net.fetch``'s, and Label Studio's token goes to Label Studio only.
The server, the project jobs and the learning path all load images through
``TaskImageLoader``, so they share one set of limits, policy and errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import encode_presign_fileuri

from backend.net.fetch import (
    FETCH_TIMEOUT_SETTING, ImageFetchError, TrustedOrigin, UrlPolicy, check_text, fetch_url, url_scheme,
)
from backend.images import ImageLimits, decode_image
from backend.labelstudio.access import LabelStudioAccess, authorization_header
from backend.net.redact import without_credentials
from backend.settings import Settings
from backend.net.urls import HTTP_SCHEMES, url_origin

_CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")


@dataclass(frozen=True)
class TaskImage:
    data: bytes  # as downloaded: the feature cache keys encodings by these bytes
    pixels: np.ndarray  # (H, W, 3) uint8, EXIF orientation applied


@dataclass(frozen=True)
class DownloadBudget:
    """The time all image downloads of one request may take together (FREESEG_FETCH_BUDGET_SECONDS).

    Without it a request's N images could take N times FREESEG_FETCH_TIMEOUT in series,
    long after Label Studio stopped waiting for the answer.
    """

    seconds: float
    end: float

    @classmethod
    def starting_now(cls, seconds: float) -> DownloadBudget:
        return cls(seconds, time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())


@dataclass(frozen=True)
class TaskImageLoader:
    """Loads the image of a task with the settings' limits (FREESEG_MAX_IMAGE_*), URL policy and timeouts."""

    limits: ImageLimits
    policy: UrlPolicy
    timeout: float
    budget_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> TaskImageLoader:
        return cls(settings.image_limits, UrlPolicy(settings.allowed_url_hosts, settings.allow_private_urls),
                   settings.fetch_timeout, settings.fetch_budget_seconds)

    def budget(self) -> DownloadBudget:
        """A budget for the downloads of one request, starting now."""
        return DownloadBudget.starting_now(self.budget_seconds)

    def load(
        self, task: dict, image_key: str, access: LabelStudioAccess, budget: DownloadBudget | None = None
    ) -> TaskImage:
        """The task's image under ``data[image_key]``, downloaded within what is left of ``budget`` (a request's);
        raises ImageFetchError or ImageError."""
        url = task_image_url(task, image_key)
        timeout, setting = self.timeout, FETCH_TIMEOUT_SETTING
        if budget is not None and budget.remaining() < timeout:
            timeout = budget.remaining()
            setting = f"FREESEG_FETCH_BUDGET_SECONDS: {budget.seconds:g} s for all the images of a request"
        data = fetch_image_bytes(url, task.get("id"), access, self.limits, timeout, policy=self.policy,
                                 timeout_setting=setting)
        return TaskImage(data, decode_image(data, self.limits))


def task_image_url(task: dict, image_key: str) -> str:
    """The image URL a task holds under ``data[image_key]``."""
    data = task.get("data")
    value = data.get(image_key) if isinstance(data, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise ImageFetchError("missing_data", f"task {task.get('id')} has no image URL in data[{image_key!r}]")
    return value.strip()


def fetch_image_bytes(
    url: str,
    task_id: int | None,
    access: LabelStudioAccess,
    limits: ImageLimits,
    timeout: float = 10.0,
    *,
    policy: UrlPolicy = UrlPolicy(),
    timeout_setting: str = FETCH_TIMEOUT_SETTING,
) -> bytes:
    """The bytes behind a task's image URL, at most ``limits.max_bytes`` of them (see ``fetch_url``).

    Raises ImageFetchError.
    """
    check_text(url)
    if url.lower().startswith("data:"):
        return fetch_url(url, limits, timeout, policy)
    return fetch_url(_resolve(url, task_id, access), limits, timeout, policy, _trusted(access), shown_as=url,
                     timeout_setting=timeout_setting)


def _trusted(access: LabelStudioAccess) -> TrustedOrigin | None:
    """Label Studio's origin, with its token and what to check when it refuses."""
    if not access.url:
        return None
    if not access.api_key:
        return TrustedOrigin(access.url, None, "set LABEL_STUDIO_API_KEY to a Label Studio access token")
    return TrustedOrigin(
        access.url, authorization_header(access.api_key),
        "check LABEL_STUDIO_API_KEY: a legacy token is sent as 'Token <key>' (legacy tokens must be "
        "enabled in Label Studio), a personal access token (a JWT) as 'Bearer <key>'",
    )


def _resolve(url: str, task_id: int | None, access: LabelStudioAccess) -> str:
    """The http(s) URL to ask first: Label Studio's own for paths and cloud URIs."""
    scheme = url_scheme(url)
    if url.startswith("/"):
        return _label_studio_base(url, access) + url
    if scheme in _CLOUD_SCHEMES:
        if task_id is None:
            raise ImageFetchError("unsupported_url",
                                  f"cloud URI {without_credentials(url)} needs the task id to be presigned")
        # The SDK's encoding is the one Label Studio's presign view decodes.
        presign = f"/tasks/{task_id}/presign/?fileuri={encode_presign_fileuri(url)}"
        return _label_studio_base(url, access) + presign
    if scheme in HTTP_SCHEMES:
        return url
    raise ImageFetchError(
        "unsupported_url",
        f"unsupported image URL {without_credentials(url)}: expected http(s), a Label Studio path, "
        f"{', '.join(s + '://' for s in _CLOUD_SCHEMES)} or data:",
    )


def _label_studio_base(url: str, access: LabelStudioAccess) -> str:
    if not access.url:
        raise ImageFetchError(
            "unsupported_url",
            f"image URL {without_credentials(url)} is served by Label Studio; set LABEL_STUDIO_URL "
            "(e.g. http://localhost:8080) so the backend can fetch it",
        )
    origin = url_origin(access.url)
    if origin is None or origin[0] not in HTTP_SCHEMES or not origin[1]:
        raise ImageFetchError("unsupported_url", "LABEL_STUDIO_URL must be an http(s) URL like http://localhost:8080")
    return access.url.rstrip("/")
