"""The storage wing: one Redis client factory with one policy, and one place that decides Redis or this machine."""

from __future__ import annotations

import ast
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis.backoff import NoBackoff

from backend.settings import Settings
from backend.storage.backing import (
    FEEDBACK_FOLDER,
    feature_cache,
    feedback_store,
    project_memories,
    runs_redis,
    shared_feature_cache,
    shared_store,
)
from backend.storage.feature_cache import ProcessCache, RedisCache
from backend.storage.feedback_log import FeedbackRecord, FileFeedbackStore, RedisFeedbackStore
from backend.storage.redis_client import BLOCKING, STORE_TIMEOUT_SECONDS, redis_client
from backend.storage.shared_store import FileStore, RedisStore, StoreError
from tests.redis_server import RedisServer, free_port

BACKEND = Path(__file__).resolve().parents[1] / "backend"
PASSWORD = "s3cret-Pa55"
RECORD = FeedbackRecord("p", 1, 1.0, "v", ())


def backend_sources() -> Iterator[tuple[Path, ast.AST]]:
    for path in BACKEND.rglob("*.py"):
        yield path, ast.parse(path.read_text())


# --- the factory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0.3, STORE_TIMEOUT_SECONDS, BLOCKING])
def test_a_client_bounds_connects_and_replies_alike_and_never_retries(timeout: float | None) -> None:
    client = redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout)
    settings = client.connection_pool.connection_kwargs
    assert settings["socket_timeout"] == settings["socket_connect_timeout"] == timeout
    retry = client.connection_pool.make_connection().retry
    assert retry.get_retries() == 0 and isinstance(retry._backoff, NoBackoff)


def test_every_redis_client_of_the_backend_comes_from_the_factory() -> None:
    built = sorted(f"{path.relative_to(BACKEND)}:{node.lineno}" for path, tree in backend_sources()
                   if path.name != "redis_client.py" for node in ast.walk(tree)
                   if isinstance(node, ast.Call) and _called_name(node) in ("from_url", "Redis", "StrictRedis"))
    assert not built, f"Redis clients built outside backend/storage/redis_client.py: {built}"


def _called_name(call: ast.Call) -> str | None:
    """``from_url`` of ``redis.Redis.from_url(...)``, ``Redis`` of ``Redis(...)``."""
    function = call.func
    return function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)


@contextmanager
def silent_redis() -> Iterator[tuple[str, list[socket.socket]]]:
    """An URL whose server accepts connections and never answers, and the connections it accepted."""
    accepted: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)

        def accept() -> None:
            while True:
                try:
                    accepted.append(listener.accept()[0])
                except OSError:  # the listener closed
                    return

        threading.Thread(target=accept, daemon=True).start()
        try:
            yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0", accepted
        finally:
            listener.shutdown(socket.SHUT_RDWR)
            for connection in accepted:
                connection.close()


def _reads(url: str, timeout: float) -> dict[str, Callable[[], object]]:
    """A read of each store on the Redis at ``url``, each client waiting ``timeout`` for a reply."""
    return {
        "shared store": lambda: RedisStore(url, timeout_seconds=timeout).get("projects:1"),
        "feedback log": lambda: RedisFeedbackStore(url, timeout_seconds=timeout).records("p"),
        "feature cache": lambda: RedisCache(url, ttl_seconds=60, timeout_seconds=timeout).get("k"),
    }


@pytest.mark.parametrize("store", ["shared store", "feedback log", "feature cache"])
def test_a_silent_redis_costs_each_store_one_connection_and_one_timeout(store: str) -> None:
    with silent_redis() as (url, accepted):
        started = time.monotonic()
        try:
            _reads(url, 0.3)[store]()
        except StoreError:
            pass  # the stores raise, the cache misses: the next test checks which
        assert 0.25 < time.monotonic() - started < 1.9  # the timeout given, not the stores' default (2 s)
        assert len(accepted) == 1  # not retried


@pytest.mark.parametrize("call", [
    pytest.param(lambda url: RedisStore(url, timeout_seconds=0.5).get("projects:1"), id="store-get"),
    pytest.param(lambda url: RedisStore(url, timeout_seconds=0.5).put("projects:1", b"x"), id="store-put"),
    pytest.param(lambda url: RedisStore(url, timeout_seconds=0.5).names("memory", "1."), id="store-names"),
    pytest.param(lambda url: RedisFeedbackStore(url, timeout_seconds=0.5).add(RECORD), id="feedback-add"),
    pytest.param(lambda url: RedisFeedbackStore(url, timeout_seconds=0.5).records("p"), id="feedback-records"),
])
def test_redis_down_is_the_same_error_kind_from_every_store(call: Callable[[str], object]) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreError, match=r"at redis://127\.0\.0\.1:\d+/0 \(REDIS_URL\)") as raised:
        call(url)
    assert raised.value.kind == "store"
    assert PASSWORD not in str(raised.value)


def test_redis_down_is_a_miss_for_the_feature_cache() -> None:
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", ttl_seconds=60, timeout_seconds=0.5)
    assert cache.get("k") is None


def test_a_bad_redis_url_is_a_store_error_naming_the_setting() -> None:
    for store in (RedisStore, RedisFeedbackStore):
        with pytest.raises(StoreError, match=r"bad Redis URL .*\(REDIS_URL\)"):
            store("http://127.0.0.1:6379/0")


# --- the one backing decision --------------------------------------------------------------------


def test_only_backing_reads_redis_url() -> None:
    readers = sorted(f"{path.relative_to(BACKEND)}:{node.lineno}" for path, tree in backend_sources()
                     if path.name not in ("backing.py", "settings.py") for node in ast.walk(tree)
                     if isinstance(node, ast.Attribute) and node.attr == "redis_url")
    assert not readers, f"decide Redis or not in backend/storage/backing.py, not in {readers}"


def test_without_redis_everything_stays_on_this_machine(tmp_path: Path) -> None:
    settings = Settings(redis_url=None, model_dir=tmp_path)
    store = shared_store(settings)
    assert isinstance(store, FileStore) and store.folder == tmp_path
    assert project_memories(settings).store.store.folder == tmp_path
    assert isinstance(feature_cache(settings), ProcessCache)
    assert shared_feature_cache(settings) is None
    feedback = feedback_store(settings)
    assert isinstance(feedback, FileFeedbackStore) and feedback.folder == tmp_path / FEEDBACK_FOLDER
    with pytest.raises(ValueError, match="REDIS_URL"):
        runs_redis(settings)


def test_with_redis_everything_shared_is_in_it(redis_server: RedisServer, tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_server.url, model_dir=tmp_path, memory_ttl_seconds=100)
    store = shared_store(settings)
    assert isinstance(store, RedisStore)
    assert isinstance(project_memories(settings).store.store, RedisStore)
    assert isinstance(feature_cache(settings), RedisCache)
    assert isinstance(shared_feature_cache(settings), RedisCache)
    feedback = feedback_store(settings)
    assert isinstance(feedback, RedisFeedbackStore)
    store.put("memory:backing.fp", b"m")
    store.put("projects:backing", b"p")
    feedback.add(FeedbackRecord("backing", 1, 1.0, "v", ()))
    connection = runs_redis(settings)
    assert connection.connection_pool.connection_kwargs["socket_timeout"] is None  # RQ's workers block on the queue
    assert 0 < connection.ttl("freeseg:memory:backing.fp") <= 100  # FREESEG_MEMORY_TTL_SECONDS
    assert connection.ttl("freeseg:projects:backing") == -1  # setups do not expire
    assert connection.llen("freeseg:feedback:backing") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_project_name_one_store_refuses_every_store_refuses(tmp_path: Path) -> None:
    for name in ("..", "a/b", "", "sp ace"):
        with pytest.raises(ValueError):
            FileStore(tmp_path).get(f"projects:{name}")
        with pytest.raises(ValueError, match="project name"):
            FileFeedbackStore(tmp_path).records(name)
