"""HTTP connections that go only to addresses checked beforehand, and end at a deadline.

A URL policy that resolves a host and then lets requests resolve it again can be fooled:
a name may answer a public address to the check and a private one to the connection (DNS
rebinding), and a parser may read another host than the check did. A ``Route`` carries the
host as checked and the addresses it resolved to; the ``RoutedAdapter`` connects to those
addresses only (in order, as ``socket.create_connection`` would), refuses a request whose
host requests reads otherwise, and uses no proxy (a proxy would resolve the name again).
The Host header, TLS SNI and certificate check still use the host name.

A ``Deadline`` shuts down every socket of a download when its time is up: socket timeouts
bound each read only, and http.client reads headers a line at a time, so a server sending a
header byte a second would otherwise hold the download as long as it likes.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection

from backend.net.urls import HttpUrl, canonical_host

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Deadline:
    """When a whole download must be over; then every socket it watches is shut down, ending any read."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._timer.cancel()
        with self._lock:
            for watched in self._watched:
                watched.close()
            self._watched.clear()

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self._end

    def remaining(self) -> float:
        """Seconds left, 0 when none are."""
        return max(0.0, self._end - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down at the deadline (now, if it has passed). A duplicate descriptor is kept, as TLS
        wrapping detaches the socket object urllib3 made; shutting the duplicate down ends the connection."""
        with self._lock:
            if self._expired:
                sock.shutdown(socket.SHUT_RDWR)
                return
            self._watched.append(sock.dup())

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            for watched in self._watched:
                try:
                    watched.shutdown(socket.SHUT_RDWR)
                except OSError:  # closed by the server already
                    pass


@dataclass(frozen=True)
class Route:
    """Where one request goes: its URL's host as checked, the addresses to connect to, and its deadline."""

    url: HttpUrl
    addresses: tuple[IPAddress, ...]
    deadline: Deadline

    def connect(self, socket_options: Any) -> socket.socket:
        """A socket to the first address that accepts, watched by the deadline."""
        failure: OSError = OSError(f"no address for {self.url.host}")
        for address in self.addresses:
            left = self.deadline.remaining()
            if not left:
                raise TimeoutError(f"the deadline of {self.deadline.seconds:g} s passed")
            try:
                sock = connection.create_connection((str(address), self.url.port), left, socket_options=socket_options)
            except OSError as error:
                failure = error
                continue
            self.deadline.watch(sock)
            return sock
        raise failure


class MisreadHost(requests.exceptions.InvalidURL):
    """requests read another scheme, host or port from the URL than the one checked."""


class _Routed:
    """A urllib3 connection that opens its socket along ``route``, not by resolving its host."""

    def __init__(self, *args: Any, route: Route, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.route = route

    def _new_conn(self) -> socket.socket:
        try:
            return self.route.connect(self.socket_options)
        except TimeoutError as error:  # socket.timeout included
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out: {error}") from error
        except OSError as error:
            raise NewConnectionError(self, f"Failed to establish a new connection: {error}") from error


class _RoutedHTTPConnection(_Routed, HTTPConnection):
    pass


class _RoutedHTTPSConnection(_Routed, HTTPSConnection):
    pass


class _RoutedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _RoutedHTTPConnection


class _RoutedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _RoutedHTTPSConnection


class RoutedAdapter(HTTPAdapter):
    """Sends requests along one ``Route``: its addresses only, no proxy, no retries."""

    def __init__(self, route: Route) -> None:
        self.route = route
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _RoutedHTTPPool, "https": _RoutedHTTPSPool}

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=None)

    def get_connection_with_tls_context(self, request: requests.PreparedRequest, verify: Any,
                                        proxies: Any = None, cert: Any = None) -> HTTPConnectionPool:
        pool = super().get_connection_with_tls_context(request, verify, None, cert)
        checked = self.route.url
        read = (pool.scheme, canonical_host(pool.host or "").rstrip("."), pool.port)
        if read != (checked.scheme, checked.host.rstrip("."), checked.port):
            raise MisreadHost(f"the HTTP client reads the URL's host as {read[1]}:{read[2]}, not the one checked")
        pool.conn_kw["route"] = self.route
        return pool
