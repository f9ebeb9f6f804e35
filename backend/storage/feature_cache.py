"""A cache of Encodings, so asking again about the same image skips the diffusion model.

Two stores share one interface (``FeatureCache``): ``ProcessCache``, an in-process LRU
bounded in bytes (the default), and ``RedisCache`` (shared by workers and replicas).
Both hold ``serialize``d Encodings: safetensors bytes compressed with zlib, never pickle,
so a value read back cannot run code.

A key names the image (sha256 of its bytes), the models and feature settings
(the Segmenter's fingerprint) and the Encoding format, so a change of any of them is a
miss, never a wrong answer. An entry that cannot be read, or whose fingerprint is not
the one in its key, is a miss too: it is dropped and the next put replaces it.

The cache must never make a prediction fail: RedisCache turns every Redis error into a
miss (get) or a no-op (put), logs the outage once, and leaves Redis alone for
``retry_after_seconds`` before trying it again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import numpy as np
import redis

from backend.pipeline.encoding import FORMAT_VERSION, Encoding, EncodingFormatError
from backend.net.redact import without_credentials
from backend.storage.redis_client import redis_client

log = logging.getLogger(__name__)

KEY_PREFIX = "freeseg:enc"
# zlib level 1: float16 features are mostly incompressible mantissa bits, so higher levels
# save next to nothing and cost time (measured: docs/benchmarks.md, "Feature cache compression").
COMPRESSION_LEVEL = 1


def cache_key(image_bytes: bytes, fingerprint: str) -> str:
    """``freeseg:enc:v{FORMAT_VERSION}:{fingerprint}:{sha256 of the image bytes}``."""
    return f"{KEY_PREFIX}:v{FORMAT_VERSION}:{fingerprint}:{hashlib.sha256(image_bytes).hexdigest()}"


def serialize(encoding: Encoding) -> bytes:
    """The Encoding's safetensors bytes, byte-shuffled and compressed with zlib.

    The bytes are split into two planes, the first and the second byte of every 16-bit word:
    the sign-and-exponent bytes of float16 features repeat a lot, their mantissa bytes do not,
    so zlib finds the repeats in one plane that it misses interleaved, in less time too
    (docs/benchmarks.md, "Feature cache compression", has the figures).
    """
    raw = encoding.to_bytes()
    words = np.frombuffer(raw + b"\0" * (len(raw) % 2), dtype=np.uint8).reshape(-1, 2)
    return struct.pack("<Q", len(raw)) + zlib.compress(words.T.tobytes(), COMPRESSION_LEVEL)


def deserialize(data: bytes) -> Encoding:
    """The Encoding ``serialize`` made; ``EncodingFormatError`` for anything else."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        planes = np.frombuffer(zlib.decompress(data[8:]), dtype=np.uint8)
    except (struct.error, zlib.error) as error:
        raise EncodingFormatError(f"not a compressed encoding: {error}") from error
    if planes.size % 2 or not 0 <= planes.size - length <= 1:
        raise EncodingFormatError("compressed encoding has the wrong length")
    return Encoding.from_bytes(planes.reshape(2, -1).T.tobytes()[:length])


class CacheMetrics(Protocol):
    """What a cache reports (the server feeds it to Prometheus)."""

    def hit(self) -> None: ...

    def miss(self) -> None: ...  # including entries dropped as unreadable or of other models

    def error(self) -> None: ...  # a get or put that Redis could not serve (failed, or skipped while backing off)

    def held(self, total_bytes: int) -> None: ...  # ProcessCache: the bytes it holds now

    def written(self, value_bytes: int) -> None: ...  # RedisCache: the bytes of the value it just wrote


class FeatureCache(Protocol):
    def get(self, key: str) -> Encoding | None: ...

    def put(self, key: str, encoding: Encoding) -> None: ...


class _NoMetrics:
    def hit(self) -> None:
        pass

    def miss(self) -> None:
        pass

    def error(self) -> None:
        pass

    def held(self, total_bytes: int) -> None:
        pass

    def written(self, value_bytes: int) -> None:
        pass


class _EntryReader:
    """Reads entries back, warning about bad ones once per kind of problem (then at debug)."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def read(self, key: str, data: bytes) -> Encoding | None:
        try:
            encoding = deserialize(data)
        except EncodingFormatError as error:
            self._report("unreadable", f"dropping an unreadable feature cache entry: {error}")
            return None
        expected = _key_fingerprint(key)
        if expected is not None and encoding.fingerprint != expected:
            self._report(
                "fingerprint",
                f"dropping a feature cache entry of fingerprint {encoding.fingerprint}, expected {expected}",
            )
            return None
        return encoding

    def _report(self, kind: str, message: str) -> None:
        if kind in self._warned:
            log.debug(message)
        else:
            self._warned.add(kind)
            log.warning("%s (further ones are logged at debug level)", message)


def _key_fingerprint(key: str) -> str | None:
    """The fingerprint in a key made by ``cache_key``; None for other keys (not checked)."""
    prefix = f"{KEY_PREFIX}:v{FORMAT_VERSION}:"
    if not key.startswith(prefix):
        return None
    fingerprint, _, _digest = key[len(prefix) :].rpartition(":")
    return fingerprint


class ProcessCache:
    """A thread-safe LRU of serialized Encodings, holding at most ``max_bytes`` of them.

    Memory is the compressed size, and every get returns a fresh Encoding. An entry
    larger than ``max_bytes`` is not stored.
    """

    def __init__(self, max_bytes: int, metrics: CacheMetrics | None = None) -> None:
        self._max_bytes = max_bytes
        self._metrics = metrics or _NoMetrics()
        self._entries: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self._total_bytes = 0
        self._lock = threading.Lock()
        self._reader = _EntryReader()

    def get(self, key: str) -> Encoding | None:
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
        if data is None:
            self._metrics.miss()
            return None
        encoding = self._reader.read(key, data)  # decompressing outside the lock
        if encoding is None:
            with self._lock:
                if self._entries.get(key) is data:  # not replaced meanwhile
                    self._remove(key)
                    self._metrics.held(self._total_bytes)
            self._metrics.miss()
            return None
        self._metrics.hit()
        return encoding

    def put(self, key: str, encoding: Encoding) -> None:
        data = serialize(encoding)
        with self._lock:
            self._remove(key)
            if len(data) <= self._max_bytes:
                self._entries[key] = data
                self._total_bytes += len(data)
                while self._total_bytes > self._max_bytes:
                    self._remove(next(iter(self._entries)))
            self._metrics.held(self._total_bytes)

    def _remove(self, key: str) -> None:
        data = self._entries.pop(key, None)
        if data is not None:
            self._total_bytes -= len(data)


_FAILED = object()


class RedisCache:
    """Encodings in Redis, each kept ``ttl_seconds``; Redis being down is only a miss.

    Password and TLS come through the URL (``redis://:password@host:6379/0``,
    ``rediss://...``). Every Redis error is counted and turns into a miss or a no-op;
    the first of an outage is logged (with the URL less its credentials), and Redis is
    then left alone for ``retry_after_seconds``, so a dead server costs at most one
    timeout per interval instead of one per request.
    """

    def __init__(
        self,
        url: str,
        ttl_seconds: int,
        metrics: CacheMetrics | None = None,
        timeout_seconds: float = 0.5,
        retry_after_seconds: float = 5.0,
    ) -> None:
        if ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be at least 1, not {ttl_seconds}")
        self._client = redis_client(url, timeout_seconds)  # never retried: the back-off below is the retry policy
        self._ttl_seconds = ttl_seconds
        self._metrics = metrics or _NoMetrics()
        self._retry_after_seconds = retry_after_seconds
        self._where = without_credentials(url)
        self._password = unquote(urlsplit(url).password or "") or None
        self._reader = _EntryReader()
        self._lock = threading.Lock()
        self._down = False
        self._retry_at = 0.0  # time.monotonic() from which to try Redis again while down

    def get(self, key: str) -> Encoding | None:
        data = self._call(self._client.get, key)
        if data is _FAILED:
            return None
        if data is None:
            self._metrics.miss()
            return None
        encoding = self._reader.read(key, data)
        if encoding is None:
            self._call(self._client.delete, key)
            self._metrics.miss()
            return None
        self._metrics.hit()
        return encoding

    def put(self, key: str, encoding: Encoding) -> None:
        if self._backing_off():  # spare the serialization too
            self._metrics.error()
            return
        data = serialize(encoding)
        if self._call(self._client.set, key, data, ex=self._ttl_seconds) is not _FAILED:
            self._metrics.written(len(data))

    def _call(self, command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The command's result, or ``_FAILED`` (counted, the outage logged) if Redis did not answer."""
        if self._backing_off():
            self._metrics.error()
            return _FAILED
        try:
            result = command(*args, **kwargs)
        except (redis.RedisError, OSError) as error:
            self._failed(error)
            return _FAILED
        if self._down:
            self._recovered()
        return result

    def _backing_off(self) -> bool:
        return self._down and time.monotonic() < self._retry_at

    def _failed(self, error: Exception) -> None:
        self._metrics.error()
        with self._lock:
            first = not self._down
            self._down = True
            self._retry_at = time.monotonic() + self._retry_after_seconds
        if first:
            reason = f"{type(error).__name__}: {error}"
            if self._password:
                reason = reason.replace(self._password, "***")
            log.warning(
                "feature cache %s is unavailable (%s); going on without it, trying again every %gs",
                self._where, reason, self._retry_after_seconds,
            )

    def _recovered(self) -> None:
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            log.info("feature cache is back (%s)", self._where)


