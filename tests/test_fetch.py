"""backend/net: bounded, SSRF-safe downloads (fetch.py), URLs read once (urls.py), connections to checked addresses.

The hosts are local recording servers (tests/image_hosts.py), names resolve through the ``dns`` fixture, and
``connections`` refuses every connection while recording where it would have gone.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
import urllib3.util.connection

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.task_images import fetch_image_bytes
from backend.net.fetch import UrlPolicy
from backend.net.urls import parse_http_url
from backend.settings import Settings
from tests.http_server import RecordingServer, Route, send
from tests.image_hosts import (
    IMAGE, LIMITS, PRIVATE_OK, SECRET_QUERY, access_to, fetch_error, image, ls, other, redirect_to, slow_headers,
)


PUBLIC_IP = "93.184.216.34"


def chunked(total: int) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Connection", "close")
        handler.end_headers()
        for start in range(0, total, 500):
            piece = b"x" * min(500, total - start)
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.wfile.write(b"0\r\n\r\n")
        handler.close_connection = True

    return route


def declared_length(size: int) -> Route:
    return lambda handler: send(handler, 200, b"x" * size)


def stalled_body(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    handler.wfile.write(b"x" * 10)
    handler.wfile.flush()
    time.sleep(3)


def test_404(other: RecordingServer, ls: RecordingServer) -> None:
    error = fetch_error(f"{other.url}/gone.png?{SECRET_QUERY}", access_to(ls), policy=PRIVATE_OK)
    assert error.kind == "http_404"
    assert f"cannot fetch image {other.url}/gone.png: HTTP 404" in str(error)


def test_slow_server_times_out(other: RecordingServer, ls: RecordingServer) -> None:
    other.routes["/slow.png"] = slow_headers
    started = time.monotonic()
    error = fetch_error(f"{other.url}/slow.png?{SECRET_QUERY}", access_to(ls), timeout=0.5, policy=PRIVATE_OK)
    assert error.kind == "timeout"
    assert "within 0.5 s" in str(error)
    assert time.monotonic() - started < 2.0


def test_stalled_body_times_out(other: RecordingServer, ls: RecordingServer) -> None:
    other.routes["/stall.png"] = stalled_body
    started = time.monotonic()
    assert fetch_error(f"{other.url}/stall.png", access_to(ls), timeout=0.5, policy=PRIVATE_OK).kind == "timeout"
    assert time.monotonic() - started < 2.0


def test_declared_length_over_the_limit(other: RecordingServer, ls: RecordingServer) -> None:
    other.routes["/big.png"] = declared_length(LIMITS.max_bytes + 1)
    error = fetch_error(f"{other.url}/big.png", access_to(ls), policy=PRIVATE_OK)
    assert error.kind == "too_large"
    assert f"declares {LIMITS.max_bytes + 1} bytes" in str(error)


def test_chunked_body_over_the_limit(other: RecordingServer, ls: RecordingServer) -> None:
    other.routes["/chunked.png"] = chunked(LIMITS.max_bytes * 3)
    error = fetch_error(f"{other.url}/chunked.png", access_to(ls), policy=PRIVATE_OK)
    assert error.kind == "too_large"
    assert f"exceeds the limit of {LIMITS.max_bytes} bytes" in str(error)


def test_bodies_at_the_limit_are_accepted(other: RecordingServer, ls: RecordingServer) -> None:
    other.routes["/exact.png"] = declared_length(LIMITS.max_bytes)
    other.routes["/chunked.png"] = chunked(LIMITS.max_bytes)
    for path in ("/exact.png", "/chunked.png"):
        body = fetch_image_bytes(f"{other.url}{path}", 1, access_to(ls), LIMITS, policy=PRIVATE_OK)
        assert body == b"x" * LIMITS.max_bytes


def test_connection_refused(ls: RecordingServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = fetch_error(f"http://127.0.0.1:{port}/x.png?{SECRET_QUERY}", access_to(ls), policy=PRIVATE_OK)
    assert error.kind == "connection"
    assert f"cannot fetch image http://127.0.0.1:{port}/x.png: " in str(error)


def test_redirect_loop_stops(ls: RecordingServer) -> None:
    ls.routes["/data/upload/loop.png"] = redirect_to(f"/data/upload/loop.png?{SECRET_QUERY}")
    error = fetch_error("/data/upload/loop.png", access_to(ls))
    assert error.kind == "too_many_redirects"
    assert len(ls.requests) == 6


def test_redirect_to_another_scheme_is_refused(ls: RecordingServer) -> None:
    ls.routes["/data/upload/x.png"] = redirect_to("file:///etc/passwd")
    assert fetch_error("/data/upload/x.png", access_to(ls)).kind == "unsupported_url"


@pytest.mark.parametrize("data", [IMAGE, b"x" * LIMITS.max_bytes, b"y" * (LIMITS.max_bytes - 1)])
def test_data_uri_is_decoded(data: bytes) -> None:
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert fetch_image_bytes(uri, None, LabelStudioAccess(), LIMITS) == data


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("data:image/png;base64,not base64!", "unsupported_url"),
        ("data:text/plain,hello", "unsupported_url"),
        ("data:image/png;base64," + base64.b64encode(b"x" * (LIMITS.max_bytes + 1)).decode(), "too_large"),
        ("data:" + "image/png;" * 100 + "base64", "unsupported_url"),
    ],
)
def test_bad_data_uris(uri: str, kind: str) -> None:
    error = fetch_error(uri, LabelStudioAccess())
    assert error.kind == kind
    assert len(str(error)) < 200


# URL policy: no request may reach a host the policy refuses (SSRF).


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every connection urllib3 tries, none of which is made: each fails as refused."""
    tried: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        tried.append(address)
        raise ConnectionRefusedError("no connections in this test")

    monkeypatch.setattr(urllib3.util.connection, "create_connection", refuse)
    return tried


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Fake names resolved to the addresses the test puts here; names ending in .invalid do not resolve."""
    names: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: object, *args: object, **kwargs: object) -> list:
        if host in names:
            return [
                (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                for ip in names[host]
            ]
        if host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


def test_loopback_on_another_port_is_refused_by_default_and_allowed_on_request(
    ls: RecordingServer, other: RecordingServer
) -> None:
    other.routes["/img.png"] = image
    url = f"{other.url}/img.png?{SECRET_QUERY}"
    error = fetch_error(url, access_to(ls))
    assert error.kind == "forbidden_url"
    assert str(error) == (
        f"cannot fetch image {other.url}/img.png: host 127.0.0.1 resolves to 127.0.0.1, a loopback address: "
        "set FREESEG_ALLOW_PRIVATE_URLS=true to allow it"
    )
    assert other.requests == [] and ls.requests == []
    assert fetch_image_bytes(url, 1, access_to(ls), LIMITS, policy=PRIVATE_OK) == IMAGE
    assert len(other.requests) == 1


def test_redirect_to_a_private_address_is_refused_at_the_hop(ls: RecordingServer, other: RecordingServer) -> None:
    ls.routes["/tasks/3/presign/"] = redirect_to(f"{other.url}/bucket/cat.png?{SECRET_QUERY}")
    other.routes["/bucket/cat.png"] = image
    error = fetch_error("s3://bucket/cat.png", access_to(ls), task_id=3)
    assert error.kind == "forbidden_url"
    message = str(error)
    assert message.startswith(f"cannot fetch image s3://bucket/cat.png (redirected to {other.url}/bucket/cat.png): ")
    assert "FREESEG_ALLOW_PRIVATE_URLS=true" in message
    assert len(ls.requests) == 1
    assert other.requests == []


def test_redirect_to_a_host_not_allowed_is_refused(ls: RecordingServer, other: RecordingServer) -> None:
    ls.routes["/data/upload/x.png"] = redirect_to(f"{other.url}/img.png")
    other.routes["/img.png"] = image
    policy = UrlPolicy(allowed_hosts=("localhost",), allow_private=True)
    error = fetch_error("/data/upload/x.png", access_to(ls), policy=policy)
    assert error.kind == "forbidden_url"
    assert str(error).endswith("host 127.0.0.1 is not in FREESEG_ALLOWED_URL_HOSTS")
    assert other.requests == []


def test_allowed_hosts_are_exact_names(ls: RecordingServer, other: RecordingServer) -> None:
    other.routes["/img.png"] = image
    port = other.server_address[1]
    policy = UrlPolicy(allowed_hosts=("LOCALHOST",), allow_private=True)
    error = fetch_error(f"http://127.0.0.1:{port}/img.png", access_to(ls), policy=policy)
    assert error.kind == "forbidden_url"
    assert "host 127.0.0.1 is not in FREESEG_ALLOWED_URL_HOSTS" in str(error)
    assert other.requests == []
    assert fetch_image_bytes(f"http://localhost:{port}/img.png", 1, access_to(ls), LIMITS, policy=policy) == IMAGE
    assert len(other.requests) == 1


@pytest.mark.parametrize("host", ["evil.test", "example.com.evil.test", "notexample.com", "example.org"])
def test_allowed_suffix_refuses_other_hosts_without_connecting(
    ls: RecordingServer, dns: dict[str, list[str]], connections: list, host: str
) -> None:
    dns[host] = [PUBLIC_IP]
    error = fetch_error(f"http://{host}/img.png", access_to(ls), policy=UrlPolicy(allowed_hosts=(".example.com",)))
    assert error.kind == "forbidden_url"
    assert f"host {host} is not in FREESEG_ALLOWED_URL_HOSTS" in str(error)
    assert connections == []


@pytest.mark.parametrize("host", ["img.example.com", "a.b.example.com", "example.com", "IMG.Example.COM."])
def test_allowed_suffix_accepts_its_hosts(
    ls: RecordingServer, other: RecordingServer, dns: dict[str, list[str]], host: str
) -> None:
    other.routes["/img.png"] = image
    dns[host.lower()] = ["127.0.0.1"]  # the fake public name leads to the stand-in server
    dns[host.lower().rstrip(".")] = ["127.0.0.1"]
    policy = UrlPolicy(allowed_hosts=(".example.com",), allow_private=True)
    url = f"http://{host}:{other.server_address[1]}/img.png"
    assert fetch_image_bytes(url, 1, access_to(ls), LIMITS, policy=policy) == IMAGE
    assert len(other.requests) == 1


def test_public_host_passes_the_default_policy(
    ls: RecordingServer, dns: dict[str, list[str]], connections: list
) -> None:
    dns["images.example.com"] = [PUBLIC_IP]
    error = fetch_error("http://images.example.com/img.png", access_to(ls))
    assert error.kind == "connection"  # allowed, then stopped by the fixture rather than the policy
    assert connections == [(PUBLIC_IP, 80)]  # the address checked, not the name resolved again


@pytest.mark.parametrize(
    ("host", "refusal"),
    [
        ("[::1]", "::1, a loopback address"),
        ("[::ffff:127.0.0.1]", "(IPv4 127.0.0.1, a loopback address)"),
        ("[::ffff:10.1.2.3]", "(IPv4 10.1.2.3, a private address)"),
        ("[64:ff9b::a9fe:a9fe]", "(IPv4 169.254.169.254, a link-local address)"),
        ("[2002:7f00:1::]", "(IPv4 127.0.0.1, a loopback address)"),
        ("[fe80::1]", "fe80::1, a link-local address"),
        ("[fd00::1]", "fd00::1, a private address"),
        ("169.254.169.254", "169.254.169.254, a link-local address"),
        ("10.0.0.1", "10.0.0.1, a private address"),
        ("192.168.1.1", "192.168.1.1, a private address"),
        ("0.0.0.0", "0.0.0.0, an unspecified address"),
        ("224.0.0.1", "224.0.0.1, a multicast address"),
        ("100.64.0.1", "100.64.0.1, a non-global address"),
    ],
)
def test_non_global_ip_literals_are_refused(ls: RecordingServer, connections: list, host: str, refusal: str) -> None:
    error = fetch_error(f"http://{host}:8000/latest/meta-data?{SECRET_QUERY}", access_to(ls))
    assert error.kind == "forbidden_url"
    assert f"{refusal}: set FREESEG_ALLOW_PRIVATE_URLS=true to allow it" in str(error)
    assert connections == []


def test_name_resolving_to_link_local_is_refused(
    ls: RecordingServer, dns: dict[str, list[str]], connections: list
) -> None:
    dns["metadata.test"] = ["169.254.169.254"]
    error = fetch_error("http://metadata.test/latest/meta-data/", access_to(ls))
    assert error.kind == "forbidden_url"
    assert "host metadata.test resolves to 169.254.169.254, a link-local address" in str(error)
    assert connections == []


def test_every_resolved_address_must_be_public(
    ls: RecordingServer, dns: dict[str, list[str]], connections: list
) -> None:
    dns["mixed.test"] = [PUBLIC_IP, "::ffff:10.0.0.5"]
    error = fetch_error("http://mixed.test/img.png", access_to(ls))
    assert error.kind == "forbidden_url"
    assert "(IPv4 10.0.0.5, a private address)" in str(error)
    assert connections == []


def test_unresolvable_host_is_a_connection_error(
    ls: RecordingServer, dns: dict[str, list[str]], connections: list
) -> None:
    error = fetch_error(f"http://nowhere.invalid/img.png?{SECRET_QUERY}", access_to(ls))
    assert error.kind == "connection"
    assert "cannot fetch image http://nowhere.invalid/img.png: cannot resolve host nowhere.invalid" in str(error)
    assert connections == []


def test_data_uri_needs_no_policy_check(dns: dict[str, list[str]]) -> None:
    uri = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    policy = UrlPolicy(allowed_hosts=("images.example.com",))
    assert fetch_image_bytes(uri, None, LabelStudioAccess(), LIMITS, policy=policy) == IMAGE


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [("a.com,.b.org", ("a.com", ".b.org")), (" a.com , .b.org, ", ("a.com", ".b.org")), ('["a.com"]', ("a.com",))],
)
def test_settings_read_the_url_policy(monkeypatch: pytest.MonkeyPatch, hosts: str, expected: tuple[str, ...]) -> None:
    monkeypatch.setenv("FREESEG_ALLOWED_URL_HOSTS", hosts)
    monkeypatch.setenv("FREESEG_ALLOW_PRIVATE_URLS", "true")
    settings = Settings()
    assert settings.allowed_url_hosts == expected
    assert settings.allow_private_urls is True
    policy = UrlPolicy(settings.allowed_url_hosts, settings.allow_private_urls)
    assert policy == UrlPolicy(tuple(expected), True)


def test_settings_default_to_the_secure_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FREESEG_ALLOWED_URL_HOSTS", raising=False)
    monkeypatch.delenv("FREESEG_ALLOW_PRIVATE_URLS", raising=False)
    settings = Settings()
    assert UrlPolicy(settings.allowed_url_hosts, settings.allow_private_urls) == UrlPolicy()


# One reading of a URL: what the check reads is what the client connects to, and the token follows it.


def test_a_backslash_cannot_pass_the_policy_for_a_loopback_host(ls: RecordingServer, other: RecordingServer) -> None:
    """The check would see a public address after the '@'; the client would connect to loopback."""
    other.routes["/img.png"] = image
    error = fetch_error(f"http://127.0.0.1:{other.server_address[1]}\\@{PUBLIC_IP}/img.png", access_to(ls))
    assert error.kind == "ambiguous_url"
    assert other.requests == [] and ls.requests == []


AMBIGUOUS = {
    # form: (URL with {ls} and {other} for the two ports, why it is refused)
    "backslash-userinfo": ("http://127.0.0.1:{other}\\@127.0.0.1:{ls}/img.png", "a backslash ends the URL's host"),
    "backslash-as-path": ("http://127.0.0.1:{other}\\img.png", "a backslash ends the URL's host"),
    "backslashes-as-slashes": ("http:\\\\127.0.0.1:{other}/img.png", "does not start with scheme://host"),
    "one-slash": ("http:/127.0.0.1:{other}/img.png", "does not start with scheme://host"),
    "userinfo": ("http://user:pass@127.0.0.1:{ls}/img.png", "user info"),
    "empty-userinfo": ("http://@127.0.0.1:{ls}/img.png", "user info"),
    "host-as-userinfo": ("http://127.0.0.1:{ls}@127.0.0.1:{other}/img.png", "user info"),
    "encoded-slash": ("http://127.0.0.1%2F@127.0.0.1:{ls}/img.png", "user info"),
    "encoded-host": ("http://127.0.0.1%2F:{other}/img.png", "percent sign"),
    "encoded-backslash": ("http://127.0.0.1%5C:{other}/img.png", "percent sign"),
    "encoded-at": ("http://127.0.0.1%40127.0.0.1:{other}/img.png", "percent sign"),
    "encoded-colon": ("http://127.0.0.1%3A{other}/img.png", "percent sign"),
    "tab-in-host": ("http://127.0.0.1\t:{other}/img.png", "control character"),
    "newline-in-path": ("http://127.0.0.1:{other}/i\nmg.png", "control character"),
    "nul": ("http://127.0.0.1:{ls}\x00.evil/img.png", "control character"),
    "space-in-host": ("http://127.0.0.1 :{other}/img.png", "percent sign or whitespace"),
    "unicode-space-in-host": ("http://127.0.0.1\u3000:{other}/img.png", "percent sign or whitespace"),
    "two-ports": ("http://127.0.0.1:{other}:{ls}/img.png", "port"),
    "signed-port": ("http://127.0.0.1:+{other}/img.png", "port"),
    "arabic-digits-port": ("http://127.0.0.1:\u0668\u0660/img.png", "port"),
    "empty-port": ("http://127.0.0.1:/img.png", "port"),
    "empty-host": ("http:///img.png", "no host"),
    "unclosed-ipv6": ("http://[::1/img.png", "closing bracket"),
    "ipv6-zone": ("http://[fe80::1%25lo]:{other}/img.png", "percent sign"),
    "junk-after-ipv6": ("http://[::1]x:{other}/img.png", "port"),
    "bad-host-character": ("http://127.0.0.1;.evil:{other}/img.png", "characters a host name cannot"),
}


@pytest.mark.parametrize(("form", "why"), AMBIGUOUS.values(), ids=AMBIGUOUS.keys())
def test_urls_that_parsers_read_differently_are_refused_before_any_request(
    ls: RecordingServer, other: RecordingServer, form: str, why: str
) -> None:
    ls.routes["/img.png"] = other.routes["/img.png"] = image
    url = form.format(ls=ls.server_address[1], other=other.server_address[1])
    error = fetch_error(url, access_to(ls), policy=PRIVATE_OK)
    assert error.kind == "ambiguous_url"
    assert why in str(error)
    assert other.requests == [] and ls.requests == []


@pytest.mark.parametrize(
    ("host", "expected"),
    [("LOCALHOST", "localhost"), ("localhost.", "localhost."), ("[::1]", "::1"), ("[0:0::1]", "::1")],
)
def test_hosts_are_compared_as_parsed(host: str, expected: str) -> None:
    """Case and IPv6 spelling do not make another origin; a trailing dot does (another name to a resolver)."""
    assert parse_http_url(f"http://{host}:8080/x").host == expected
    assert parse_http_url(f"HTTP://{host}/x").origin == ("http", expected, 80)


def test_an_international_host_name_is_read_as_requests_sends_it() -> None:
    assert parse_http_url("https://Bücher.example/x.png").origin == ("https", "xn--bcher-kva.example", 443)


def test_an_ipv6_host_in_another_spelling_is_the_same_host(ls: RecordingServer, connections: list) -> None:
    error = fetch_error("http://[0:0:0::1]:8000/img.png", access_to(ls), policy=PRIVATE_OK)
    assert error.kind == "connection"  # the client read the host as the check did; the fixture refused to connect
    assert connections == [("::1", 8000)]


def test_a_name_is_resolved_once_and_the_connection_goes_to_the_address_checked(
    ls: RecordingServer, other: RecordingServer, monkeypatch: pytest.MonkeyPatch, connections: list
) -> None:
    """DNS rebinding: a public address for the check, loopback afterwards; the second answer is never used."""
    answers = iter([PUBLIC_IP, "127.0.0.1", "127.0.0.1"])
    asked: list[str] = []

    def getaddrinfo(host: str, port: object, *args: object, **kwargs: object) -> list:
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    error = fetch_error(f"http://rebind.test:{other.server_address[1]}/img.png", access_to(ls))
    assert error.kind == "connection"  # the fixture refuses every connection
    assert asked == ["rebind.test"]
    assert connections == [(PUBLIC_IP, other.server_address[1])]
    assert other.requests == []


def test_every_checked_address_is_tried_in_order(ls: RecordingServer, other: RecordingServer,
                                                  dns: dict[str, list[str]]) -> None:
    """A name with an address that refuses connections (here ::1, or a closed port) falls back to the next."""
    other.routes["/img.png"] = image
    dns["two.test"] = ["127.0.0.3", "127.0.0.1"]  # nothing listens on 127.0.0.3 at that port
    url = f"http://two.test:{other.server_address[1]}/img.png"
    assert fetch_image_bytes(url, 1, access_to(ls), LIMITS, policy=PRIVATE_OK) == IMAGE
    assert len(other.requests) == 1 and other.requests[0].headers["Host"] == f"two.test:{other.server_address[1]}"


# The whole exchange, headers included, ends at the deadline (a request's budget: test_labelstudio_images.py).


@pytest.fixture
def header_trickler() -> Iterator[int]:
    """The port of a raw server that answers a status line, then one header byte every 0.1 s (4 s in all at most)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    stop = threading.Event()

    def trickle() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            request = b""
            try:
                while b"\r\n\r\n" not in request and len(request) < 65536 and (piece := conn.recv(4096)):
                    request += piece
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(40):
                    if stop.wait(0.1):
                        break
                    conn.sendall(b"x")
            except OSError:  # the client hung up
                pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(10)


def test_a_host_trickling_its_headers_is_cut_off_at_the_deadline(
    ls: RecordingServer, header_trickler: int
) -> None:
    started = time.monotonic()
    url = f"http://127.0.0.1:{header_trickler}/img.png?{SECRET_QUERY}"
    error = fetch_error(url, access_to(ls), timeout=1.0, policy=PRIVATE_OK)
    took = time.monotonic() - started
    assert error.kind == "timeout"
    assert "did not finish within 1 s (FREESEG_FETCH_TIMEOUT)" in str(error)
    assert took < 1.5
