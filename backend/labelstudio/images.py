"""Fetch a task's image bytes, sending Label Studio's token only to Label Studio.

Task data holds an upload or local-files path on Label Studio, a cloud URI
that Label Studio presigns, a plain http(s) URL or a ``data:`` URI. Redirects
are followed here rather than by ``requests`` so that the Authorization header
is decided for every hop: a presign answer redirects to the cloud, which must
never see the token. Messages name the URL without its query string, since
presigned URLs carry credentials there, and never contain the token.

Every hop other than Label Studio's own origin must also pass a ``UrlPolicy``
before it is requested, so that a task cannot make the backend fetch internal
addresses (SSRF): its host must be in the allowed list, when there is one, and
all the addresses it resolves to must be public unless private ones are allowed.

A download has one deadline for all its hops and its whole body, so a server
that drips its body a byte at a time cannot hold a thread past the timeout
(headers are read by http.client: there each read waits at most the time left). No
credentials from the environment (``~/.netrc``) and no cookies are sent: the
only credential that leaves is Label Studio's token, to Label Studio.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
import time
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import encode_presign_fileuri

from backend.images import ImageLimits

_CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
_HTTP_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_REDIRECTS = 5
_NON_GLOBAL_KINDS = (
    ("loopback", "a loopback"),
    ("link_local", "a link-local"),
    ("unspecified", "an unspecified"),
    ("multicast", "a multicast"),
    ("private", "a private"),
    ("reserved", "a reserved"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix embeds an IPv4 address
_CHUNK_BYTES = 64 * 1024
# A personal access token is a JWT: three base64url parts separated by dots.
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_QUERY = re.compile(r"\?[^\s'\"<>)]*")
_HEADERS = {
    "User-Agent": "freesegdiff-label-studio-backend",
    # Images are compressed already; refusing transfer compression keeps the size checks honest.
    "Accept-Encoding": "identity",
}


class ImageFetchError(Exception):
    """A task image that could not be fetched; one line saying which URL (without secrets) and why.

    ``kind`` is short and machine-readable, for metrics: ``missing_data``,
    ``unsupported_url``, ``http_<status>``, ``timeout``, ``too_large``,
    ``connection``, ``too_many_redirects`` or ``forbidden_url``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class LabelStudioAccess:
    """Where Label Studio is (LABEL_STUDIO_URL) and its key (LABEL_STUDIO_API_KEY).

    The key is a legacy token, sent as ``Token <key>``, or a personal access
    token, a JWT, sent as ``Bearer <key>``. It is left out of ``repr`` so that
    logging the object does not log it.
    """

    url: str | None = None
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class UrlPolicy:
    """Which image hosts may be fetched, besides Label Studio's own origin (always allowed).

    ``allowed_hosts`` (FREESEG_ALLOWED_URL_HOSTS): empty allows any host; else the
    host must equal an entry, or end with an entry that starts with a dot
    (``.example.com`` allows ``example.com`` and its subdomains). ``allow_private``
    (FREESEG_ALLOW_PRIVATE_URLS): whether hosts resolving to private, loopback,
    link-local or other non-global addresses may be fetched.
    """

    allowed_hosts: tuple[str, ...] = ()
    allow_private: bool = False


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
) -> bytes:
    """The bytes behind a task's image URL, at most ``limits.max_bytes`` of them.

    ``timeout`` bounds the whole download, all hops and the whole body (kind
    ``timeout``); a hop's connection and each read of its headers wait at most
    the time left. ``policy`` is checked before every hop (kind ``forbidden_url``).
    Raises ImageFetchError.
    """
    _check_text(url)
    if url.lower().startswith("data:"):
        return _data_uri_bytes(url, limits)
    return _download(url, _resolve(url, task_id, access), access, limits, timeout, policy)


def _check_text(url: str) -> None:
    """Refuse a URL that is not valid Unicode text: JSON can carry lone surrogates, which no encoder takes."""
    try:
        url.encode("utf-8")
    except UnicodeError:
        raise ImageFetchError("unsupported_url", f"image URL {_redact(url)!a} is not valid UTF-8 text") from None


def _resolve(url: str, task_id: int | None, access: LabelStudioAccess) -> str:
    """The http(s) URL to ask first: Label Studio's own for paths and cloud URIs."""
    scheme = _scheme(url)
    if url.startswith("/"):
        return _label_studio_base(url, access) + url
    if scheme in _CLOUD_SCHEMES:
        if task_id is None:
            raise ImageFetchError("unsupported_url", f"cloud URI {_redact(url)} needs the task id to be presigned")
        # The SDK's encoding is the one Label Studio's presign view decodes.
        presign = f"/tasks/{task_id}/presign/?fileuri={encode_presign_fileuri(url)}"
        return _label_studio_base(url, access) + presign
    if scheme in _HTTP_SCHEMES:
        return url
    raise ImageFetchError(
        "unsupported_url",
        f"unsupported image URL {_redact(url)}: expected http(s), a Label Studio path, "
        f"{', '.join(s + '://' for s in _CLOUD_SCHEMES)} or data:",
    )


def _label_studio_base(url: str, access: LabelStudioAccess) -> str:
    if not access.url:
        raise ImageFetchError(
            "unsupported_url",
            f"image URL {_redact(url)} is served by Label Studio; set LABEL_STUDIO_URL "
            "(e.g. http://localhost:8080) so the backend can fetch it",
        )
    origin = _origin(access.url)
    if origin is None or origin[0] not in _HTTP_SCHEMES or not origin[1]:
        raise ImageFetchError("unsupported_url", "LABEL_STUDIO_URL must be an http(s) URL like http://localhost:8080")
    return access.url.rstrip("/")


def _download(
    original: str, url: str, access: LabelStudioAccess, limits: ImageLimits, timeout: float, policy: UrlPolicy
) -> bytes:
    """GET ``url``, following at most ``_MAX_REDIRECTS`` redirects, deciding the token and policy per hop."""
    hop = url
    deadline = _Deadline.after(timeout)
    with plain_session() as session:
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                _check_policy(hop, access, policy)
                with _get(session, hop, access, deadline) as response:
                    if not response.is_redirect:
                        _check_status(response, hop, access)
                        return _read_body(response, limits, deadline)
                    hop = _next_hop(hop, response)
            except (requests.RequestException, urllib3.exceptions.HTTPError, ImageFetchError) as exc:
                raise _failure(exc, original, url, hop, access, timeout) from None
    raise ImageFetchError(
        "too_many_redirects", f"cannot fetch image {_redact(original)}: more than {_MAX_REDIRECTS} redirects"
    )


def _failure(
    exc: requests.RequestException | urllib3.exceptions.HTTPError | ImageFetchError,
    original: str,
    first: str,
    hop: str,
    access: LabelStudioAccess,
    timeout: float,
) -> ImageFetchError:
    """One line: the task's URL, the hop that failed if it was a redirect, and why."""
    error = exc if isinstance(exc, ImageFetchError) else _request_error(exc, access, timeout)
    via = "" if hop == first else f" (redirected to {_redact(hop)})"
    return ImageFetchError(error.kind, f"cannot fetch image {_redact(original)}{via}: {error}")


def _check_policy(url: str, access: LabelStudioAccess, policy: UrlPolicy) -> None:
    """Refuse ``url`` unless it is Label Studio's or passes ``policy``; resolves its host to check it."""
    if _is_label_studio(url, access):
        return
    origin = _origin(url)
    if origin is None or not origin[1]:
        raise ImageFetchError("unsupported_url", "invalid URL")
    _, host, port = origin
    host = host.rstrip(".")
    if policy.allowed_hosts and not any(_host_matches(host, entry) for entry in policy.allowed_hosts):
        raise ImageFetchError("forbidden_url", f"host {host} is not in FREESEG_ALLOWED_URL_HOSTS")
    if policy.allow_private:
        return
    for address in _addresses(host, port):
        refusal = _non_global(address)
        if refusal:
            raise ImageFetchError(
                "forbidden_url",
                f"host {host} resolves to {refusal}: set FREESEG_ALLOW_PRIVATE_URLS=true to allow it",
            )


def _host_matches(host: str, entry: str) -> bool:
    entry = entry.strip().lower().rstrip(".")
    if entry.startswith("."):
        return host == entry[1:] or host.endswith(entry)
    return bool(entry) and host == entry.strip("[]")


def _addresses(host: str, port: int | None) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address ``host`` resolves to (an IP literal is its own)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ImageFetchError("connection", f"cannot resolve host {host}: {exc}") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]
    if not addresses:
        raise ImageFetchError("connection", f"cannot resolve host {host}: no addresses")
    return addresses


def _non_global(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is not public ("10.0.0.1, a private address"), or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address inside IPv6 (mapped, 6to4, NAT64) is judged as IPv4.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            refusal = _non_global(embedded)
            return f"{address} (IPv4 {refusal})" if refusal else None
    for kind, name in _NON_GLOBAL_KINDS:
        if getattr(address, f"is_{kind}"):
            return f"{address}, {name} address"
    return None if address.is_global else f"{address}, a non-global address"


def plain_session() -> requests.Session:
    """A session that adds no credentials of its own.

    Without an explicit ``auth``, requests adds the ``~/.netrc`` password of the
    URL's host to any request; a no-op ``auth`` turns that off while proxies
    and CA bundles still come from the environment. Cookies are refused: one
    that Label Studio sets would follow a redirect to another port of its host.
    """
    session = requests.Session()
    session.auth = _no_credentials
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=()))
    return session


def _no_credentials(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


@dataclass(frozen=True)
class _Deadline:
    """When a whole download must be over, whatever the server sends and however slowly."""

    seconds: float
    end: float

    @classmethod
    def after(cls, seconds: float) -> _Deadline:
        return cls(seconds, time.monotonic() + seconds)

    def remaining(self) -> float:
        """Seconds left; raises ImageFetchError (``timeout``) when none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise _timeout(self.seconds)
        return left


def _timeout(seconds: float) -> ImageFetchError:
    return ImageFetchError("timeout", f"the download did not finish within {seconds:g} s (FREESEG_FETCH_TIMEOUT)")


def _get(session: requests.Session, url: str, access: LabelStudioAccess, deadline: _Deadline) -> requests.Response:
    headers = dict(_HEADERS)
    if access.api_key and _is_label_studio(url, access):
        headers["Authorization"] = authorization_header(access.api_key)
    return session.get(url, headers=headers, stream=True, allow_redirects=False, timeout=deadline.remaining())


def authorization_header(api_key: str) -> str:
    """``Bearer <key>`` for a personal access token (a JWT), ``Token <key>`` for a legacy token."""
    key = api_key.strip()
    return f"Bearer {key}" if _JWT.fullmatch(key) else f"Token {key}"


def _is_label_studio(url: str, access: LabelStudioAccess) -> bool:
    """Whether ``url`` has Label Studio's scheme, host and port: only such URLs get the token."""
    origin = _origin(url)
    return origin is not None and access.url is not None and origin == _origin(access.url)


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """Scheme, host and port, with the scheme's default port filled in; None when unreadable."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None


def _next_hop(url: str, response: requests.Response) -> str:
    try:
        target = urljoin(url, response.headers["location"])
    except ValueError:
        raise ImageFetchError("unsupported_url", "redirect to an invalid URL") from None
    if _scheme(target) not in _HTTP_SCHEMES:
        raise ImageFetchError("unsupported_url", f"redirect to {_redact(target)}, which is not http(s)")
    return target


def _scheme(url: str) -> str:
    """The URL's scheme in lower case, or "" (read without urlsplit, which refuses some URLs)."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def _check_status(response: requests.Response, url: str, access: LabelStudioAccess) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    message = f"HTTP {status} {response.reason or ''}".rstrip()
    if status in (401, 403):
        message += f"; {_access_hint(url, access)}"
    raise ImageFetchError(f"http_{status}", message)


def _access_hint(url: str, access: LabelStudioAccess) -> str:
    if not _is_label_studio(url, access):
        return "the image host refused access (a presigned URL may have expired)"
    if not access.api_key:
        return "set LABEL_STUDIO_API_KEY to a Label Studio access token"
    return (
        "check LABEL_STUDIO_API_KEY: a legacy token is sent as 'Token <key>' (legacy tokens must be "
        "enabled in Label Studio), a personal access token (a JWT) as 'Bearer <key>'"
    )


def _read_body(response: requests.Response, limits: ImageLimits, deadline: _Deadline) -> bytes:
    """Stream the body, refusing it as soon as it is known to exceed the limit or the deadline."""
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise ImageFetchError(
            "too_large", f"the server declares {declared} bytes, over the limit of {limits.max_bytes} bytes"
        )
    body = bytearray()
    while chunk := _read_some(response, deadline):
        body += chunk
        if len(body) > limits.max_bytes:
            raise ImageFetchError("too_large", f"the body exceeds the limit of {limits.max_bytes} bytes")
    return bytes(body)


def _read_some(response: requests.Response, deadline: _Deadline) -> bytes:
    """The next part of the body that has arrived (b"" at its end), waiting at most until the deadline.

    ``read1`` returns what one read gives rather than waiting for a full chunk,
    and the socket's timeout shrinks to the time left, so a slow sender meets
    the deadline within one read.
    """
    left = deadline.remaining()
    connection = response.raw.connection
    if connection is not None and connection.sock is not None:
        connection.sock.settimeout(left)
    return response.raw.read1(_CHUNK_BYTES, decode_content=True)


def _request_error(
    exc: requests.RequestException | urllib3.exceptions.HTTPError, access: LabelStudioAccess, timeout: float
) -> ImageFetchError:
    """Classify a requests or urllib3 failure; its text is scrubbed, as it may quote the query string."""
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return _timeout(timeout)
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
        return ImageFetchError("unsupported_url", "invalid URL")
    reason = _QUERY.sub("", " ".join(str(exc).split()))
    if access.api_key:
        reason = reason.replace(access.api_key, "***")
    return ImageFetchError("connection", f"{type(exc).__name__}: {reason}")


def _data_uri_bytes(url: str, limits: ImageLimits) -> bytes:
    """Decode a base64 ``data:`` URI, checking its size before decoding it."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ImageFetchError("unsupported_url", f"unsupported data URI {_redact(url)}: only base64 data is supported")
    payload = "".join(payload.split())
    size = len(payload) // 4 * 3 - (len(payload) - len(payload.rstrip("=")))
    if size > limits.max_bytes:
        raise ImageFetchError("too_large", f"data URI holds {size} bytes, over the limit of {limits.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise ImageFetchError("unsupported_url", f"data URI {_redact(url)} is not valid base64") from None


def _redact(url: str) -> str:
    """The URL as messages may show it: without credentials, query string, fragment or data."""
    if url.lower().startswith("data:"):
        return url.partition(",")[0][:60] + ",..."
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an invalid URL)"
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path
