"""Stand-ins for Label Studio and another image host, shared by the tests of task images and of fetching.

``ls`` and ``other`` are recording servers (tests/http_server.py); ``fetch_error`` fetches a URL that
must fail and checks that its message hides every secret (tokens, presigned queries).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from backend.images import ImageLimits
from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.task_images import fetch_image_bytes
from backend.net.fetch import ImageFetchError, UrlPolicy
from tests.http_server import RecordingServer, Route, send

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
TOKEN = "abc"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyX2lkIjoxfQ.c2lnbmF0dXJlLXNlY3JldA"
SECRET_QUERY = "X-Amz-Signature=s3cr3t"
LIMITS = ImageLimits(max_bytes=2000)
# The stand-ins for other hosts listen on loopback, which the default policy refuses.
PRIVATE_OK = UrlPolicy(allow_private=True)
DEFAULT_POLICY = UrlPolicy()


def image(handler: BaseHTTPRequestHandler) -> None:
    send(handler, 200, IMAGE, {"Content-Type": "image/png"})


def redirect_to(url: str) -> Route:
    return lambda handler: send(handler, 302, headers={"Location": url})


def status(code: int) -> Route:
    return lambda handler: send(handler, code, b"no")


def slow_headers(handler: BaseHTTPRequestHandler) -> None:
    time.sleep(3)
    image(handler)


@pytest.fixture
def ls() -> Iterator[RecordingServer]:
    """Stands in for Label Studio."""
    with RecordingServer() as server:
        yield server


@pytest.fixture
def other() -> Iterator[RecordingServer]:
    """Stands in for a cloud bucket or a public web server."""
    with RecordingServer() as server:
        yield server


def access_to(server: RecordingServer, api_key: str | None = TOKEN) -> LabelStudioAccess:
    return LabelStudioAccess(url=server.url, api_key=api_key)


def fetch_error(
    url: str,
    access: LabelStudioAccess,
    task_id: int | None = 1,
    timeout: float = 5.0,
    policy: UrlPolicy = DEFAULT_POLICY,
) -> ImageFetchError:
    with pytest.raises(ImageFetchError) as caught:
        fetch_image_bytes(url, task_id, access, LIMITS, timeout=timeout, policy=policy)
    message = str(caught.value)
    assert "\n" not in message
    for secret in (TOKEN, JWT, SECRET_QUERY, "?"):
        assert secret not in message
    return caught.value
