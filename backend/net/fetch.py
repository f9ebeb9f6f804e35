"""Fetch the bytes behind a URL safely: bounded in size and time, with no credential but one.

This is the general HTTP part of getting a task's image (``backend.labelstudio.task_images``
knows Label Studio's URLs). Redirects are followed here rather than by ``requests`` so
that the Authorization header is decided for every hop: only the ``TrustedOrigin`` (Label
Studio) gets it, and a presign answer that redirects to the cloud must never see it.
Messages name URLs without their query string, since presigned URLs carry credentials
there, and never contain the credential.

Every hop other than the trusted origin must pass a ``UrlPolicy`` before it is
requested, so that a task cannot make the backend fetch internal addresses (SSRF): its
host must be in the allowed list, when there is one, and all the addresses it resolves to
must be public unless private ones are allowed. Each hop's URL is read once
(``backend.net.urls``, which refuses URLs that parsers read differently), its host resolved
once, and the connection goes to those addresses only (``backend.net.pinned``).

A download has one deadline for all its hops, their headers and the whole body: at the
deadline its sockets are shut down, so a server that drips headers or body a byte at a
time cannot hold a thread past the timeout. No credentials from the environment
(``~/.netrc``), no proxy and no cookies are used.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urljoin

import requests
import urllib3.exceptions

from backend.images import ImageLimits
from backend.net.pinned import Deadline, IPAddress, MisreadHost, Route, RoutedAdapter
from backend.net.redact import without_credentials
from backend.net.urls import HTTP_SCHEMES, AmbiguousUrl, HttpUrl, parse_http_url, url_origin

FETCH_TIMEOUT_SETTING = "FREESEG_FETCH_TIMEOUT"
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
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_QUERY = re.compile(r"\?[^\s'\"<>)]*")
_REFUSED_BY_HOST = "the image host refused access (a presigned URL may have expired)"
_HEADERS = {
    "User-Agent": "freesegdiff-label-studio-backend",
    # Images are compressed already; refusing transfer compression keeps the size checks honest.
    "Accept-Encoding": "identity",
}


class ImageFetchError(Exception):
    """A task image that could not be fetched; one line saying which URL (without secrets) and why.

    ``kind`` is short and machine-readable, for metrics: ``missing_data``,
    ``unsupported_url``, ``http_<status>``, ``timeout``, ``too_large``,
    ``connection``, ``too_many_redirects``, ``forbidden_url`` or ``ambiguous_url``
    (a URL that parsers read differently: a backslash or ``@`` in its authority, ...).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class UrlPolicy:
    """Which image hosts may be fetched, besides the trusted origin (Label Studio's, always allowed).

    ``allowed_hosts`` (FREESEG_ALLOWED_URL_HOSTS): empty allows any host; else the
    host must equal an entry, or end with an entry that starts with a dot
    (``.example.com`` allows ``example.com`` and its subdomains). ``allow_private``
    (FREESEG_ALLOW_PRIVATE_URLS): whether hosts resolving to private, loopback,
    link-local or other non-global addresses may be fetched.
    """

    allowed_hosts: tuple[str, ...] = ()
    allow_private: bool = False


@dataclass(frozen=True)
class TrustedOrigin:
    """The one origin (scheme, host, port of ``url``) that is always allowed and gets ``authorization``.

    ``refused_hint`` is added to a 401 or 403 from it: what to check in the settings.
    """

    url: str
    authorization: str | None = field(default=None, repr=False)
    refused_hint: str = ""


def fetch_url(
    url: str, limits: ImageLimits, timeout: float, policy: UrlPolicy, trusted: TrustedOrigin | None = None,
    *, shown_as: str | None = None, timeout_setting: str = FETCH_TIMEOUT_SETTING,
) -> bytes:
    """The bytes behind an http(s) or ``data:`` URL, at most ``limits.max_bytes`` of them.

    ``timeout`` bounds the whole download, all hops, their headers and the whole body (kind
    ``timeout``, whose message names ``timeout_setting``). ``policy`` is checked before every
    hop but the trusted origin's (kind ``forbidden_url``). Messages name ``shown_as`` (the URL
    a task holds) when it differs from the URL asked. Raises ImageFetchError.
    """
    check_text(url)
    if url.lower().startswith("data:"):
        return _data_uri_bytes(url, limits)
    return _download(shown_as or url, url, trusted, limits, _Limit(timeout, timeout_setting), policy)


def check_text(url: str) -> None:
    """Refuse a URL that is not valid Unicode text: JSON can carry lone surrogates, which no encoder takes."""
    try:
        url.encode("utf-8")
    except UnicodeError:
        raise ImageFetchError("unsupported_url", f"image URL {without_credentials(url)!a} is not valid UTF-8 text") from None


@dataclass(frozen=True)
class _Limit:
    """A download's time limit and the setting that gave it, which a timeout's message names."""

    seconds: float
    setting: str

    def error(self) -> ImageFetchError:
        seconds = round(self.seconds, 2)
        return ImageFetchError("timeout", f"the download did not finish within {seconds:g} s ({self.setting})")


def _download(
    original: str, url: str, trusted: TrustedOrigin | None, limits: ImageLimits, limit: _Limit, policy: UrlPolicy
) -> bytes:
    """GET ``url``, following at most ``_MAX_REDIRECTS`` redirects, deciding the token and policy per hop."""
    hop = url
    with Deadline(limit.seconds) as deadline:
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                route = _route(hop, trusted, policy, deadline, limit)
                trusted_hop = trusted if _is_trusted(route.url, trusted) else None  # only it gets the credential
                with _session(route) as session, _get(session, hop, route, trusted_hop, limit) as response:
                    if not response.is_redirect:
                        _check_status(response, trusted_hop)
                        body = _read_body(response, limits)
                        if deadline.expired:  # the deadline shut the socket, which ends a body of no set length
                            raise limit.error()
                        return body
                    hop = _next_hop(hop, response)
            except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                # A read that the deadline cut short fails as whatever the shut socket looked like.
                error = limit.error() if deadline.expired else exc
                raise _failure(error, original, url, hop, trusted, limit) from None
            except ImageFetchError as exc:
                raise _failure(exc, original, url, hop, trusted, limit) from None
    raise ImageFetchError(
        "too_many_redirects", f"cannot fetch image {without_credentials(original)}: more than {_MAX_REDIRECTS} redirects"
    )


def _failure(
    exc: requests.RequestException | urllib3.exceptions.HTTPError | ImageFetchError,
    original: str,
    first: str,
    hop: str,
    trusted: TrustedOrigin | None,
    limit: _Limit,
) -> ImageFetchError:
    """One line: the task's URL, the hop that failed if it was a redirect, and why."""
    error = exc if isinstance(exc, ImageFetchError) else _request_error(exc, trusted, limit)
    via = "" if hop == first else f" (redirected to {without_credentials(hop)})"
    return ImageFetchError(error.kind, f"cannot fetch image {without_credentials(original)}{via}: {error}")


def _route(url: str, trusted: TrustedOrigin | None, policy: UrlPolicy, deadline: Deadline, limit: _Limit) -> Route:
    """Read ``url`` once, check it against the trusted origin or ``policy``, and resolve its host once.

    The connection goes to exactly the addresses checked here; the trusted origin is
    resolved the same way, unchecked.
    """
    target = _parse(url)
    host = target.host.rstrip(".")
    is_trusted = _is_trusted(target, trusted)
    allowed = not policy.allowed_hosts or any(_host_matches(host, entry) for entry in policy.allowed_hosts)
    if not is_trusted and not allowed:
        raise ImageFetchError("forbidden_url", f"host {host} is not in FREESEG_ALLOWED_URL_HOSTS")
    addresses = _addresses(host, target.port)
    if not is_trusted and not policy.allow_private:
        for address in addresses:
            refusal = _non_global(address)
            if refusal:
                raise ImageFetchError(
                    "forbidden_url",
                    f"host {host} resolves to {refusal}: set FREESEG_ALLOW_PRIVATE_URLS=true to allow it",
                )
    if deadline.expired:  # resolving took the time left
        raise limit.error()
    return Route(target, addresses, deadline)


def _parse(url: str) -> HttpUrl:
    try:
        return parse_http_url(url)
    except AmbiguousUrl as refusal:
        raise ImageFetchError("ambiguous_url", f"{refusal}, which HTTP clients read differently") from None


def _host_matches(host: str, entry: str) -> bool:
    entry = entry.strip().lower().rstrip(".")
    if entry.startswith("."):
        return host == entry[1:] or host.endswith(entry)
    return bool(entry) and host == entry.strip("[]")


def _addresses(host: str, port: int) -> tuple[IPAddress, ...]:
    """Every address ``host`` resolves to (an IP literal is its own), in the resolver's order."""
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ImageFetchError("connection", f"cannot resolve host {host}: {exc}") from None
    addresses = tuple(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos))
    if not addresses:
        raise ImageFetchError("connection", f"cannot resolve host {host}: no addresses")
    return addresses


def _non_global(address: IPAddress) -> str | None:
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


def _session(route: Route) -> requests.Session:
    """A session that adds no credentials of its own and connects along ``route`` only.

    Without an explicit ``auth``, requests adds the ``~/.netrc`` password of the
    URL's host to any request; a no-op ``auth`` turns that off while CA bundles still
    come from the environment. Cookies are refused: one that the trusted origin sets
    would follow a redirect to another port of its host.
    """
    session = requests.Session()
    session.auth = _no_credentials
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=()))
    session.mount(f"{route.url.scheme}://", RoutedAdapter(route))
    return session


def _no_credentials(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


def _get(
    session: requests.Session, url: str, route: Route, trusted_hop: TrustedOrigin | None, limit: _Limit
) -> requests.Response:
    """GET along ``route``; ``trusted_hop`` is the trusted origin when this hop is it, else None."""
    headers = dict(_HEADERS)
    if trusted_hop is not None and trusted_hop.authorization:
        headers["Authorization"] = trusted_hop.authorization
    left = route.deadline.remaining()
    if not left:
        raise limit.error()
    return session.get(url, headers=headers, stream=True, allow_redirects=False, timeout=left)


def _is_trusted(url: HttpUrl, trusted: TrustedOrigin | None) -> bool:
    """Whether ``url`` has the trusted origin's scheme, host and port, as parsed: only it gets its credential."""
    return trusted is not None and url.origin == url_origin(trusted.url)


def _next_hop(url: str, response: requests.Response) -> str:
    try:
        target = urljoin(url, response.headers["location"])
    except ValueError:
        raise ImageFetchError("unsupported_url", "redirect to an invalid URL") from None
    if url_scheme(target) not in HTTP_SCHEMES:
        raise ImageFetchError("unsupported_url", f"redirect to {without_credentials(target)}, which is not http(s)")
    return target


def url_scheme(url: str) -> str:
    """The URL's scheme in lower case, or "" (read without urlsplit, which refuses some URLs)."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def _check_status(response: requests.Response, trusted_hop: TrustedOrigin | None) -> None:
    """Refuse a status other than 2xx; a 401 or 403 says what to check (``trusted_hop``: the hop's, if trusted)."""
    status = response.status_code
    if 200 <= status < 300:
        return
    message = f"HTTP {status} {response.reason or ''}".rstrip()
    if status in (401, 403):
        hint = trusted_hop.refused_hint if trusted_hop is not None else _REFUSED_BY_HOST
        message += f"; {hint}"
    raise ImageFetchError(f"http_{status}", message)


def _read_body(response: requests.Response, limits: ImageLimits) -> bytes:
    """Stream the body, refusing it as soon as it is known to exceed the limit.

    ``read1`` returns what one read gives rather than waiting for a full chunk; the
    deadline ends a slow read by shutting the socket down, which may look like the end
    of a body without a declared length, hence the check after the last read.
    """
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise ImageFetchError(
            "too_large", f"the server declares {declared} bytes, over the limit of {limits.max_bytes} bytes"
        )
    body = bytearray()
    while chunk := response.raw.read1(_CHUNK_BYTES, decode_content=True):
        body += chunk
        if len(body) > limits.max_bytes:
            raise ImageFetchError("too_large", f"the body exceeds the limit of {limits.max_bytes} bytes")
    return bytes(body)


def _request_error(
    exc: requests.RequestException | urllib3.exceptions.HTTPError, trusted: TrustedOrigin | None, limit: _Limit
) -> ImageFetchError:
    """Classify a requests or urllib3 failure; its text is scrubbed, as it may quote the query string."""
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return limit.error()
    if isinstance(exc, MisreadHost):
        return ImageFetchError("ambiguous_url", str(exc))
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
        return ImageFetchError("unsupported_url", "invalid URL")
    reason = _QUERY.sub("", " ".join(str(exc).split()))
    if trusted is not None and trusted.authorization:
        reason = reason.replace(trusted.authorization.split()[-1], "***")
    return ImageFetchError("connection", f"{type(exc).__name__}: {reason}")


def _data_uri_bytes(url: str, limits: ImageLimits) -> bytes:
    """Decode a base64 ``data:`` URI, checking its size before decoding it."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ImageFetchError("unsupported_url", f"unsupported data URI {without_credentials(url)}: only base64 data is supported")
    payload = "".join(payload.split())
    size = len(payload) // 4 * 3 - (len(payload) - len(payload.rstrip("=")))
    if size > limits.max_bytes:
        raise ImageFetchError("too_large", f"data URI holds {size} bytes, over the limit of {limits.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise ImageFetchError("unsupported_url", f"data URI {without_credentials(url)} is not valid base64") from None
