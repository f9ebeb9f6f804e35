"""Read an http(s) URL's scheme, host and port once, refusing any URL that parsers read differently.

``urllib.parse`` ends a URL's authority at ``/ ? #`` and takes the host after the last
``@``; urllib3 (under requests) also ends it at a backslash, so ``http://a\\@b/`` names
host ``b`` to one and ``a`` to the other. A check on one reading and a connection on the
other let a task reach a host the check never saw, with Label Studio's token. Rather than
pick one reading, every form on which readers differ is refused: a backslash ending the
authority, user info, control characters anywhere (``urllib.parse`` silently drops tabs and
newlines), whitespace or percent signs in the authority, a port that is not plain digits.
What passes has one reading, which requests also takes (``backend.net.pinned`` checks that it did).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

HTTP_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_START = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#\\]*)(.?)", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PORT = re.compile(r"[0-9]{1,5}")
_NAME = re.compile(r"[a-z0-9_.-]+")  # after IDNA: what a host name may hold


class AmbiguousUrl(ValueError):
    """A URL this module will not read: why, in words (never the URL, which may hold secrets)."""


@dataclass(frozen=True)
class HttpUrl:
    """The parts of an http(s) URL that decide where it goes; ``host`` is lower case ASCII, IPv6 without brackets."""

    scheme: str
    host: str
    port: int

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


def parse_http_url(url: str) -> HttpUrl:
    """Scheme, host and port of an absolute http(s) URL; raises AmbiguousUrl for any other or ambiguous URL."""
    if _CONTROL.search(url):
        raise AmbiguousUrl("the URL holds a control character")
    start = _START.match(url)
    if start is None:
        raise AmbiguousUrl("the URL does not start with scheme://host")
    scheme, authority, end = start.group(1).lower(), start.group(2), start.group(3)
    if scheme not in HTTP_SCHEMES:
        raise AmbiguousUrl(f"the URL's scheme is {scheme}, not http(s)")
    if end == "\\":
        raise AmbiguousUrl("a backslash ends the URL's host")
    if "@" in authority:
        raise AmbiguousUrl("the URL holds user info (user@host)")
    if "%" in authority or any(c.isspace() for c in authority):
        raise AmbiguousUrl("the URL's host holds a percent sign or whitespace")
    host, port = _host_and_port(authority)
    return HttpUrl(scheme, host, _DEFAULT_PORTS[scheme] if port is None else port)


def canonical_host(host: str) -> str:
    """``host`` lower case, an IPv6 address in its one compressed spelling, so that hosts compare as equal."""
    try:
        return str(ipaddress.IPv6Address(host))
    except ValueError:
        return host.lower()


def url_origin(url: str) -> tuple[str, str, int] | None:
    """Scheme, host and port of an http(s) URL, the default port filled in; None when unreadable or ambiguous."""
    try:
        return parse_http_url(url).origin
    except AmbiguousUrl:
        return None


def _host_and_port(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        literal, bracket, rest = authority[1:].partition("]")
        if not bracket:
            raise AmbiguousUrl("the URL's IPv6 host has no closing bracket")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise AmbiguousUrl("the URL's host is not a valid IPv6 address") from None
        host = canonical_host(literal)
    else:
        name = authority.partition(":")[0]
        host, rest = _name(name), authority[len(name):]
    if not rest:
        return host, None
    port = rest.removeprefix(":")
    if not rest.startswith(":") or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise AmbiguousUrl("the URL's port is not a number from 1 to 65535")
    return host, int(port)


def _name(host: str) -> str:
    """The host name as requests sends it: IDNA for non-ASCII names (as requests encodes them), lower case."""
    if not host:
        raise AmbiguousUrl("the URL has no host")
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise AmbiguousUrl("the URL's host is not a valid international domain name") from None
    host = host.lower()
    if not _NAME.fullmatch(host):
        raise AmbiguousUrl("the URL's host holds characters a host name cannot")
    return host
