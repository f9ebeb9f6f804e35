"""Task images: Label Studio's URLs (uploads, local files, presigned cloud storage), its token sent to it alone.

Label Studio and a cloud bucket are local recording servers (tests/image_hosts.py); how a URL is fetched
(limits, timeouts, redirects, the URL policy) is tested in test_fetch.py.
"""

from __future__ import annotations

import base64
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from backend.labelstudio.access import LabelStudioAccess, authorization_header
from backend.labelstudio.task_images import TaskImageLoader, fetch_image_bytes, task_image_url
from backend.net.fetch import ImageFetchError, UrlPolicy
from tests.http_server import RecordingServer, send
from tests.image_hosts import (
    DEFAULT_POLICY, IMAGE, JWT, LIMITS, PRIVATE_OK, SECRET_QUERY, TOKEN, access_to, fetch_error, image, ls, other,
    redirect_to, slow_headers, status,
)
from tests.test_images import encode


def test_plain_url_on_another_host_gets_no_token(ls: RecordingServer, other: RecordingServer) -> None:
    other.routes["/img.png"] = image
    assert fetch_image_bytes(f"{other.url}/img.png", 1, access_to(ls), LIMITS, policy=PRIVATE_OK) == IMAGE
    [request] = other.requests
    assert request.path == "/img.png"
    assert "Authorization" not in request.headers
    assert ls.requests == []


def test_label_studio_path_gets_the_legacy_token(ls: RecordingServer) -> None:
    ls.routes["/data/upload/x.png"] = image
    assert fetch_image_bytes("/data/upload/x.png", 1, access_to(ls), LIMITS) == IMAGE
    [request] = ls.requests
    assert request.path == "/data/upload/x.png"
    assert request.headers["Authorization"] == "Token abc"


def test_local_files_path_keeps_its_query_and_base_url_may_end_in_a_slash(ls: RecordingServer) -> None:
    ls.routes["/data/local-files/"] = image
    access = LabelStudioAccess(url=ls.url + "/", api_key=TOKEN)
    assert fetch_image_bytes("/data/local-files/?d=images/cat%201.png", 1, access, LIMITS) == IMAGE
    [request] = ls.requests
    assert request.path == "/data/local-files/?d=images/cat%201.png"
    assert request.headers["Authorization"] == "Token abc"


def test_absolute_url_to_label_studio_gets_the_token(ls: RecordingServer) -> None:
    """Same scheme, host and port: the path under which Label Studio is served does not matter."""
    ls.routes["/data/upload/x.png"] = image
    access = LabelStudioAccess(url=f"{ls.url}/label-studio", api_key=TOKEN)
    fetch_image_bytes(f"{ls.url}/data/upload/x.png", 1, access, LIMITS)
    assert ls.requests[0].headers["Authorization"] == "Token abc"


def test_jwt_key_is_sent_as_bearer(ls: RecordingServer) -> None:
    ls.routes["/data/upload/x.png"] = image
    fetch_image_bytes("/data/upload/x.png", 1, access_to(ls, JWT), LIMITS)
    assert ls.requests[0].headers["Authorization"] == f"Bearer {JWT}"


@pytest.mark.parametrize(
    ("key", "header"),
    [
        ("abc", "Token abc"),
        ("0123456789abcdef0123456789abcdef01234567", "Token 0123456789abcdef0123456789abcdef01234567"),
        (f" {JWT}\n", f"Bearer {JWT}"),
        ("a.b", "Token a.b"),
        ("a..c", "Token a..c"),
        ("a.b.c.d", "Token a.b.c.d"),
        ("a+b.c/d.e", "Token a+b.c/d.e"),
    ],
)
def test_authorization_scheme(key: str, header: str) -> None:
    assert authorization_header(key) == header


def test_no_key_means_no_header(ls: RecordingServer) -> None:
    ls.routes["/data/upload/x.png"] = image
    fetch_image_bytes("/data/upload/x.png", 1, access_to(ls, None), LIMITS)
    assert "Authorization" not in ls.requests[0].headers


def test_redirect_away_from_label_studio_drops_the_token(ls: RecordingServer, other: RecordingServer) -> None:
    ls.routes["/data/upload/x.png"] = redirect_to(f"{other.url}/img.png?{SECRET_QUERY}")
    other.routes["/img.png"] = image
    assert fetch_image_bytes("/data/upload/x.png", 1, access_to(ls), LIMITS, policy=PRIVATE_OK) == IMAGE
    assert ls.requests[0].headers["Authorization"] == "Token abc"
    [request] = other.requests
    assert request.path == f"/img.png?{SECRET_QUERY}"
    assert "Authorization" not in request.headers


def test_relative_redirect_within_label_studio_keeps_the_token(ls: RecordingServer) -> None:
    ls.routes["/data/upload/x.png"] = redirect_to("/data/upload/y.png")
    ls.routes["/data/upload/y.png"] = image
    assert fetch_image_bytes("/data/upload/x.png", 1, access_to(ls), LIMITS) == IMAGE
    assert [request.path for request in ls.requests] == ["/data/upload/x.png", "/data/upload/y.png"]
    assert all(request.headers["Authorization"] == "Token abc" for request in ls.requests)


@pytest.mark.parametrize(
    "uri", ["s3://bucket/dir/cat 1.png", "gs://b/c.png", "azure-blob://c/d.png", "azure-spi://c/e.png"]
)
def test_cloud_uri_is_presigned_by_label_studio(ls: RecordingServer, other: RecordingServer, uri: str) -> None:
    ls.routes["/tasks/7/presign/"] = redirect_to(f"{other.url}/bucket/cat.png?{SECRET_QUERY}")
    other.routes["/bucket/cat.png"] = image
    assert fetch_image_bytes(uri, 7, access_to(ls), LIMITS, policy=PRIVATE_OK) == IMAGE
    [request] = ls.requests
    parts = urlsplit(request.path)
    assert parts.path == "/tasks/7/presign/"
    [fileuri] = parse_qs(parts.query)["fileuri"]
    assert base64.urlsafe_b64decode(fileuri).decode() == uri
    assert request.headers["Authorization"] == "Token abc"
    [request] = other.requests
    assert request.path == f"/bucket/cat.png?{SECRET_QUERY}"
    assert "Authorization" not in request.headers


def test_cloud_uri_without_task_id(ls: RecordingServer) -> None:
    error = fetch_error("s3://bucket/cat.png", access_to(ls), task_id=None)
    assert error.kind == "unsupported_url"
    assert "task id" in str(error)
    assert ls.requests == []


@pytest.mark.parametrize("url", ["/data/upload/x.png", "/data/local-files/?d=x.png", "s3://bucket/x.png"])
def test_label_studio_url_missing(url: str) -> None:
    error = fetch_error(url, LabelStudioAccess(url=None, api_key=TOKEN))
    assert error.kind == "unsupported_url"
    assert "set LABEL_STUDIO_URL" in str(error)


@pytest.mark.parametrize("base", ["localhost:8080", "ftp://host", "http://"])
def test_label_studio_url_not_http(base: str) -> None:
    error = fetch_error("/data/upload/x.png", LabelStudioAccess(url=base, api_key=TOKEN))
    assert error.kind == "unsupported_url"
    assert "LABEL_STUDIO_URL must be an http(s) URL" in str(error)


@pytest.mark.parametrize("url", ["ftp://host/x.png", "file:///etc/passwd", "x.png", "javascript:alert(1)"])
def test_unsupported_urls(ls: RecordingServer, url: str) -> None:
    assert fetch_error(url, access_to(ls)).kind == "unsupported_url"
    assert ls.requests == []


@pytest.mark.parametrize(("code", "key"), [(401, TOKEN), (403, JWT)])
def test_refused_token_hints_at_token_and_bearer(ls: RecordingServer, code: int, key: str) -> None:
    ls.routes["/data/upload/x.png"] = status(code)
    error = fetch_error("/data/upload/x.png", access_to(ls, key))
    assert error.kind == f"http_{code}"
    message = str(error)
    assert f"HTTP {code}" in message
    assert "LABEL_STUDIO_API_KEY" in message
    assert "'Token <key>'" in message and "'Bearer <key>'" in message


def test_refused_without_a_key_asks_for_one(ls: RecordingServer) -> None:
    ls.routes["/data/upload/x.png"] = status(401)
    error = fetch_error("/data/upload/x.png", access_to(ls, None))
    assert "set LABEL_STUDIO_API_KEY" in str(error)


def test_expired_presigned_url_names_the_redirect_without_query(ls: RecordingServer, other: RecordingServer) -> None:
    ls.routes["/tasks/3/presign/"] = redirect_to(f"{other.url}/bucket/cat.png?{SECRET_QUERY}")
    other.routes["/bucket/cat.png"] = status(403)
    error = fetch_error("s3://bucket/cat.png", access_to(ls), task_id=3, policy=PRIVATE_OK)
    assert error.kind == "http_403"
    message = str(error)
    assert message.startswith(f"cannot fetch image s3://bucket/cat.png (redirected to {other.url}/bucket/cat.png): ")
    assert "presigned URL may have expired" in message
    assert "LABEL_STUDIO_API_KEY" not in message


def test_task_image_url() -> None:
    assert task_image_url({"id": 1, "data": {"image": " /data/upload/x.png "}}, "image") == "/data/upload/x.png"


@pytest.mark.parametrize(
    "task",
    [
        {"id": 4, "data": {"img": "/x.png"}},
        {"id": 4, "data": {"image": 3}},
        {"id": 4, "data": {"image": ""}},
        {"id": 4, "data": None},
        {"id": 4},
    ],
)
def test_task_without_image_url(task: dict) -> None:
    with pytest.raises(ImageFetchError, match=r"task 4 has no image URL in data\['image'\]") as caught:
        task_image_url(task, "image")
    assert caught.value.kind == "missing_data"


def test_access_repr_hides_the_key() -> None:
    assert TOKEN not in repr(LabelStudioAccess(url="http://localhost:8080", api_key=TOKEN))


def test_label_studio_itself_is_always_allowed(ls: RecordingServer) -> None:
    ls.routes["/data/upload/x.png"] = image
    for policy in (UrlPolicy(), UrlPolicy(allowed_hosts=("images.example.com",))):
        assert fetch_image_bytes("/data/upload/x.png", 1, access_to(ls), LIMITS, policy=policy) == IMAGE
        assert fetch_image_bytes(f"{ls.url}/data/upload/x.png", 1, access_to(ls), LIMITS, policy=policy) == IMAGE
    assert len(ls.requests) == 4


def test_a_backslash_cannot_send_label_studios_token_elsewhere(ls: RecordingServer, other: RecordingServer) -> None:
    """urllib.parse reads the host after the '@' (Label Studio), requests the one before the backslash."""
    ls.routes["/img.png"] = image
    other.routes["/img.png"] = image
    url = f"http://127.0.0.1:{other.server_address[1]}\\@127.0.0.1:{ls.server_address[1]}/img.png"
    for policy in (DEFAULT_POLICY, PRIVATE_OK):
        error = fetch_error(url, access_to(ls), policy=policy)
        assert error.kind == "ambiguous_url"
        assert "a backslash ends the URL's host" in str(error)
    assert other.requests == [] and ls.requests == []


def test_the_token_goes_to_label_studio_spelled_in_upper_case(ls: RecordingServer) -> None:
    ls.routes["/img.png"] = image
    access = LabelStudioAccess(url=f"http://LOCALHOST:{ls.server_address[1]}/", api_key=TOKEN)
    assert fetch_image_bytes(f"http://localhost:{ls.server_address[1]}/img.png", 1, access, LIMITS) == IMAGE
    assert ls.requests[0].headers["Authorization"] == f"Token {TOKEN}"


def test_a_requests_downloads_share_one_budget(ls: RecordingServer, other: RecordingServer) -> None:
    """Three images that never come cost the budget (1.5 s), not three timeouts (3 s); what is fetched in time is."""
    other.routes["/slow.png"] = slow_headers
    other.routes["/img.png"] = lambda handler: send(handler, 200, encode(Image.new("RGB", (4, 3)), "PNG"))
    loader = TaskImageLoader(LIMITS, PRIVATE_OK, timeout=1.0, budget_seconds=1.5)
    budget = loader.budget()
    started = time.monotonic()
    outcomes: list[str] = []
    for path in ("/img.png", "/slow.png", "/slow.png", "/slow.png"):
        task = {"id": 1, "data": {"image": f"{other.url}{path}"}}
        try:
            outcomes.append(str(loader.load(task, "image", access_to(ls), budget).pixels.shape))
        except ImageFetchError as error:
            assert error.kind == "timeout"
            outcomes.append(str(error).split(": ", 1)[1])
    took = time.monotonic() - started
    assert outcomes[0] == "(3, 4, 3)"
    assert outcomes[1] == "the download did not finish within 1 s (FREESEG_FETCH_TIMEOUT)"
    for outcome in outcomes[2:]:
        assert "(FREESEG_FETCH_BUDGET_SECONDS: 1.5 s for all the images of a request)" in outcome
    assert took < 1.5 + 0.4
