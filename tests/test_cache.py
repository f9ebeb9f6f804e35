"""The feature cache, in memory and against real redis-server processes on loopback ports."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis

from backend.storage.feature_cache import FORMAT_VERSION, ProcessCache, RedisCache, cache_key, deserialize, serialize
from backend.pipeline.encoding import Encoding, EncodingFormatError
from tests.redis_server import RedisServer

FINGERPRINT = "0123456789abcdef"
PASSWORD = "s3cr3t-Pa55word"


class RecordingMetrics:
    def __init__(self) -> None:
        self.hits = self.misses = self.errors = 0
        self.held_values: list[int] = []
        self.written_values: list[int] = []
        self._lock = threading.Lock()

    def hit(self) -> None:
        with self._lock:
            self.hits += 1

    def miss(self) -> None:
        with self._lock:
            self.misses += 1

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def held(self, total_bytes: int) -> None:
        with self._lock:
            self.held_values.append(total_bytes)

    def written(self, value_bytes: int) -> None:
        with self._lock:
            self.written_values.append(value_bytes)


def make_encoding(seed: int = 0, fingerprint: str = FINGERPRINT, channels: int = 64) -> Encoding:
    rng = np.random.default_rng(seed)
    return Encoding(
        features=rng.normal(size=(channels, 16, 16)).astype(np.float16),
        image_embedding=rng.normal(size=512).astype(np.float32),
        caption=f"a photo number {seed}, «ünïcode»",
        width=640,
        height=427,
        fingerprint=fingerprint,
    )


def assert_same(actual: Encoding | None, expected: Encoding) -> None:
    assert actual is not None
    np.testing.assert_array_equal(actual.features, expected.features)
    assert actual.features.dtype == np.float16
    np.testing.assert_array_equal(actual.image_embedding, expected.image_embedding)
    assert (actual.caption, actual.width, actual.height, actual.fingerprint) == (
        expected.caption, expected.width, expected.height, expected.fingerprint,
    )


def key_for(name: str, fingerprint: str = FINGERPRINT) -> str:
    return cache_key(name.encode(), fingerprint)


# --- keys and serialization -------------------------------------------------------------


def test_key_names_format_fingerprint_and_image():
    image = b"\x89PNG some image bytes"
    key = cache_key(image, FINGERPRINT)
    assert key == f"freeseg:enc:v{FORMAT_VERSION}:{FINGERPRINT}:{hashlib.sha256(image).hexdigest()}"
    assert cache_key(image, "fedcba9876543210") != key
    assert cache_key(image + b"!", FINGERPRINT) != key


def test_serialize_round_trip():
    encoding = make_encoding()
    data = serialize(encoding)
    assert not data.startswith(b"\x80")  # not a pickle
    assert_same(deserialize(data), encoding)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"not zlib at all", b"\x78\x01 broken zlib stream", __import__("zlib").compress(b"zlib, not safetensors")],
)
def test_deserialize_refuses_garbage(garbage):
    with pytest.raises(EncodingFormatError):
        deserialize(garbage)


def test_deserialize_refuses_truncated_value():
    data = serialize(make_encoding())
    with pytest.raises(EncodingFormatError):
        deserialize(data[: len(data) // 2])


def test_realistic_encoding_compresses_to_the_reported_size():
    """A (6400, 32, 32) float16 grid of gaussian noise: 13.1 MB raw, about 11.4 MB byte-shuffled and compressed."""
    rng = np.random.default_rng(0)
    encoding = Encoding(
        features=rng.normal(size=(6400, 32, 32)).astype(np.float16),
        image_embedding=rng.normal(size=512).astype(np.float32),
        caption="a photo",
        width=640,
        height=427,
        fingerprint=FINGERPRINT,
    )
    raw = len(encoding.to_bytes())
    data = serialize(encoding)
    assert raw == pytest.approx(13.11e6, rel=0.01)
    assert 11.1e6 < len(data) < 11.7e6  # about 87% of raw: only the exponent bytes of noise compress
    assert_same(deserialize(data), encoding)


# --- ProcessCache --------------------------------------------------------------------------


def test_memory_miss_then_hit():
    metrics = RecordingMetrics()
    cache = ProcessCache(max_bytes=10_000_000, metrics=metrics)
    encoding = make_encoding()
    assert cache.get(key_for("a")) is None
    cache.put(key_for("a"), encoding)
    first, second = cache.get(key_for("a")), cache.get(key_for("a"))
    assert_same(first, encoding)
    assert first is not second  # fresh objects each time
    assert (metrics.hits, metrics.misses, metrics.errors) == (2, 1, 0)
    [total] = metrics.held_values
    assert total == pytest.approx(len(serialize(encoding)), abs=64)  # safetensors orders metadata at random


def test_memory_other_fingerprint_is_a_miss():
    cache = ProcessCache(max_bytes=10_000_000)
    cache.put(key_for("a"), make_encoding())
    assert cache.get(key_for("a", fingerprint="fedcba9876543210")) is None


def test_memory_entry_of_other_fingerprint_than_its_key_is_dropped(caplog):
    caplog.set_level(logging.WARNING, logger="backend.storage.feature_cache")
    metrics = RecordingMetrics()
    cache = ProcessCache(max_bytes=10_000_000, metrics=metrics)
    for name in ("a", "b"):
        cache.put(key_for(name), make_encoding(fingerprint="fedcba9876543210"))
        assert cache.get(key_for(name)) is None
    assert (metrics.hits, metrics.misses) == (0, 2)
    assert metrics.held_values[-1] == 0  # both dropped
    assert len([r for r in caplog.records if "fingerprint" in r.getMessage()]) == 1  # once, not per entry
    good = make_encoding(seed=1)
    cache.put(key_for("a"), good)
    assert_same(cache.get(key_for("a")), good)


def test_memory_is_bounded_in_bytes_and_evicts_least_recently_used():
    encodings = {name: make_encoding(seed) for seed, name in enumerate("abcd")}
    sizes = {name: len(serialize(encoding)) for name, encoding in encodings.items()}
    max_bytes = 3 * max(sizes.values()) + 300  # room for any three, not four (sizes vary by a few bytes)
    assert max_bytes < 4 * min(sizes.values())
    metrics = RecordingMetrics()
    cache = ProcessCache(max_bytes=max_bytes, metrics=metrics)
    for name in "abc":
        cache.put(key_for(name), encodings[name])
    assert cache.get(key_for("a")) is not None  # a is now more recent than b
    cache.put(key_for("d"), encodings["d"])
    assert all(total <= max_bytes for total in metrics.held_values)
    assert metrics.held_values[-1] == pytest.approx(sizes["a"] + sizes["c"] + sizes["d"], abs=200)
    assert cache.get(key_for("b")) is None
    for name in "acd":
        assert_same(cache.get(key_for(name)), encodings[name])


def test_memory_does_not_store_an_entry_larger_than_its_bound():
    metrics = RecordingMetrics()
    cache = ProcessCache(max_bytes=1000, metrics=metrics)
    cache.put(key_for("a"), make_encoding())
    assert cache.get(key_for("a")) is None
    assert metrics.held_values == [0]


def test_memory_is_thread_safe():
    encodings = [make_encoding(seed, channels=8) for seed in range(6)]
    max_bytes = 3 * len(serialize(encodings[0])) + 500  # forces evictions all along
    metrics = RecordingMetrics()
    cache = ProcessCache(max_bytes=max_bytes, metrics=metrics)
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            rng = np.random.default_rng(worker)
            for _ in range(200):
                index = int(rng.integers(len(encodings)))
                if rng.random() < 0.5:
                    cache.put(key_for(str(index)), encodings[index])
                else:
                    found = cache.get(key_for(str(index)))
                    if found is not None:
                        assert_same(found, encodings[index])
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert metrics.hits > 0 and metrics.misses > 0 and metrics.errors == 0
    assert all(0 <= total <= max_bytes for total in metrics.held_values)


# --- real redis-server processes (tests/redis_server.py, fixtures in conftest.py) -------------


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client of the shared server, emptied before each test."""
    with redis_server.client() as client:
        client.flushdb()
        yield client


def test_redis_miss_then_hit(redis_server, raw):
    metrics = RecordingMetrics()
    cache = RedisCache(redis_server.url, ttl_seconds=60, metrics=metrics)
    encoding = make_encoding()
    assert cache.get(key_for("a")) is None
    cache.put(key_for("a"), encoding)
    assert_same(cache.get(key_for("a")), encoding)
    assert (metrics.hits, metrics.misses, metrics.errors) == (1, 1, 0)
    assert metrics.written_values == [raw.strlen(key_for("a"))] and metrics.held_values == []
    assert RedisCache(redis_server.url, ttl_seconds=60).get(key_for("a")) is not None  # shared by clients


def test_redis_other_fingerprint_is_a_miss(redis_server, raw):
    cache = RedisCache(redis_server.url, ttl_seconds=60)
    cache.put(key_for("a"), make_encoding())
    assert cache.get(key_for("a", fingerprint="fedcba9876543210")) is None


def test_redis_entries_expire(redis_server, raw):
    cache = RedisCache(redis_server.url, ttl_seconds=3)  # 3 s: a stalled runner still reads it back before it expires
    cache.put(key_for("a"), make_encoding())
    assert 0 < raw.pttl(key_for("a")) <= 3000
    assert cache.get(key_for("a")) is not None
    time.sleep(3.2)
    assert cache.get(key_for("a")) is None
    assert raw.exists(key_for("a")) == 0


def test_redis_corrupt_entry_is_a_miss_and_is_replaced(redis_server, raw, caplog):
    caplog.set_level(logging.WARNING, logger="backend.storage.feature_cache")
    metrics = RecordingMetrics()
    cache = RedisCache(redis_server.url, ttl_seconds=60, metrics=metrics)
    good = serialize(make_encoding())
    for name, value in [("a", b"\x80\x04\x95 a pickle, say"), ("b", good[: len(good) // 2]), ("c", b"")]:
        raw.set(key_for(name), value)
        assert cache.get(key_for(name)) is None
        assert raw.exists(key_for(name)) == 0  # deleted
    assert (metrics.hits, metrics.misses, metrics.errors) == (0, 3, 0)
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1  # once, not per entry

    raw.set(key_for("a"), b"garbage again")
    encoding = make_encoding(seed=1)
    cache.put(key_for("a"), encoding)  # overwrites
    assert_same(cache.get(key_for("a")), encoding)
    assert metrics.hits == 1


def test_redis_entry_of_other_fingerprint_than_its_key_is_a_miss(redis_server, raw, caplog):
    caplog.set_level(logging.WARNING, logger="backend.storage.feature_cache")
    metrics = RecordingMetrics()
    cache = RedisCache(redis_server.url, ttl_seconds=60, metrics=metrics)
    raw.set(key_for("a"), serialize(make_encoding(fingerprint="fedcba9876543210")))
    assert cache.get(key_for("a")) is None
    assert metrics.misses == 1 and metrics.errors == 0
    assert raw.exists(key_for("a")) == 0
    assert any("fingerprint fedcba9876543210" in r.getMessage() for r in caplog.records)


def timed(call: Callable[[], object]) -> object:
    started = time.monotonic()
    result = call()
    assert time.monotonic() - started < 1.0, "a cache call stalled"
    return result


def test_redis_outage_is_survived_and_recovered(start_redis, caplog):
    caplog.set_level(logging.INFO, logger="backend.storage.feature_cache")
    server = start_redis()
    metrics = RecordingMetrics()
    cache = RedisCache(server.url, ttl_seconds=60, metrics=metrics, timeout_seconds=0.5, retry_after_seconds=0.2)
    encodings = [make_encoding(seed) for seed in range(4)]

    for index, encoding in enumerate(encodings[:2]):
        timed(lambda: cache.put(key_for(str(index)), encoding))
        assert_same(timed(lambda: cache.get(key_for(str(index)))), encoding)
    assert metrics.errors == 0

    server.stop()  # killed mid-run
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # several back-off intervals: skipped calls and real retries
        for index, encoding in enumerate(encodings):
            timed(lambda: cache.put(key_for(str(index)), encoding))
            assert timed(lambda: cache.get(key_for(str(index)))) is None
        time.sleep(0.05)
    assert metrics.errors > 20
    outage = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(outage) == 1, [r.getMessage() for r in outage]
    assert f"redis://127.0.0.1:{server.port}/0" in outage[0].getMessage()

    server.start()  # same port, empty (no persistence)
    time.sleep(0.25)  # past retry_after
    errors = metrics.errors
    assert timed(lambda: cache.get(key_for("0"))) is None  # a miss now, not an error
    timed(lambda: cache.put(key_for("0"), encodings[0]))
    assert_same(timed(lambda: cache.get(key_for("0"))), encodings[0])
    assert metrics.errors == errors
    back = [r for r in caplog.records if r.levelno == logging.INFO and "feature cache is back" in r.getMessage()]
    assert len(back) == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_redis_unresponsive_server_costs_one_timeout_per_retry_interval():
    """A server that accepts connections and never answers: one timeout, then skipped until retry_after."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # never accepts: the kernel completes handshakes, nobody answers
        metrics = RecordingMetrics()
        cache = RedisCache(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", ttl_seconds=60, metrics=metrics,
                           timeout_seconds=0.2, retry_after_seconds=30)
        started = time.monotonic()
        assert cache.get(key_for("a")) is None
        assert 0.15 < time.monotonic() - started < 1.0
        for _ in range(5):
            started = time.monotonic()
            assert cache.get(key_for("a")) is None
            cache.put(key_for("a"), make_encoding())
            assert time.monotonic() - started < 0.1  # not tried: no timeout's latency (0.2 s) per request
        assert metrics.errors == 11


def test_redis_password_through_the_url(start_redis, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the client library's too
    server = start_redis(password=PASSWORD)
    encoding = make_encoding()

    cache = RedisCache(server.url, ttl_seconds=60)
    cache.put(key_for("a"), encoding)
    assert_same(cache.get(key_for("a")), encoding)

    wrong_password = "wr0ng-Pa55word"
    for url in (f"redis://:{wrong_password}@127.0.0.1:{server.port}/0", f"redis://127.0.0.1:{server.port}/0",
                f"redis://someone:{wrong_password}@127.0.0.1:{server.port}/0"):
        metrics = RecordingMetrics()
        refused = RedisCache(url, ttl_seconds=60, metrics=metrics)
        assert refused.get(key_for("a")) is None
        refused.put(key_for("b"), encoding)
        assert metrics.errors == 2 and metrics.hits == metrics.misses == 0
    assert len([r for r in caplog.records if r.name == "backend.storage.feature_cache" and r.levelno == logging.WARNING]) == 3
    with server.client() as client:
        assert client.exists(key_for("b")) == 0
    logged = caplog.text + "".join(record.getMessage() for record in caplog.records)
    assert f"127.0.0.1:{server.port}" in logged
    assert PASSWORD not in logged and wrong_password not in logged
