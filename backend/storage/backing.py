"""Where what the processes share is kept, decided here once from the settings: Redis, or this machine.

With REDIS_URL set, the shared store (project setups, memories, learning events), the feature
cache, the feedback log and queued runs' ledger are all in that Redis, the same for every worker,
replica and machine. Without it, the shared store and the feedback log are files under MODEL_DIR
(shared by the processes of one machine), the feature cache is this process's own, and runs
cannot be queued. Every store opens Redis through ``redis_client``.
"""

from __future__ import annotations

import redis

from backend.settings import Settings
from backend.storage.feature_cache import CacheMetrics, FeatureCache, ProcessCache, RedisCache
from backend.storage.feedback_log import FeedbackStore, FileFeedbackStore, RedisFeedbackStore
from backend.storage.memory_store import MEMORY_NAMESPACES, ProjectMemories, SharedMemoryStore, memory_bounds
from backend.storage.redis_client import BLOCKING, redis_client
from backend.storage.shared_store import FileStore, RedisStore, SharedStore

FEEDBACK_FOLDER = "feedback"  # under MODEL_DIR, without Redis


def shared_store(settings: Settings) -> SharedStore:
    """The store every process agrees on; memories expire after FREESEG_MEMORY_TTL_SECONDS unused (0: never)."""
    ttl = settings.memory_ttl_seconds
    expiring = dict.fromkeys(MEMORY_NAMESPACES, ttl) if ttl else {}
    if settings.redis_url:
        return RedisStore(settings.redis_url, expiring=expiring)
    return FileStore(settings.model_dir, expiring)


def project_memories(settings: Settings) -> ProjectMemories:
    """The projects' memories in ``shared_store``, within the settings' bounds and cache."""
    return ProjectMemories(SharedMemoryStore(shared_store(settings)), memory_bounds(settings),
                           settings.memory_cache_bytes)


def feature_cache(settings: Settings, metrics: CacheMetrics | None = None) -> FeatureCache:
    """Redis's cache (shared by every process using it), else this process's, bounded in bytes.

    Both report to ``metrics``: Redis the bytes it writes, the in-process cache the bytes it holds.
    """
    return shared_feature_cache(settings, metrics) or ProcessCache(settings.cache_max_bytes, metrics)


def shared_feature_cache(settings: Settings, metrics: CacheMetrics | None = None) -> FeatureCache | None:
    """Redis's cache, the server's entries; None without REDIS_URL (a one-pass job gains nothing from its own)."""
    if not settings.redis_url:
        return None
    return RedisCache(settings.redis_url, settings.cache_ttl_seconds, metrics,
                      timeout_seconds=settings.cache_timeout_seconds,
                      retry_after_seconds=settings.cache_retry_after_seconds)


def feedback_store(settings: Settings) -> FeedbackStore:
    """The feedback log: Redis's lists, else JSON-lines files under MODEL_DIR/feedback."""
    if settings.redis_url:
        return RedisFeedbackStore(settings.redis_url)
    return FileFeedbackStore(settings.model_dir / FEEDBACK_FOLDER)


def runs_redis_if_set(settings: Settings) -> redis.Redis | None:
    """The Redis of queued runs where REDIS_URL is set, else None (the runs are this process's)."""
    return runs_redis(settings) if settings.redis_url else None


def runs_redis(settings: Settings) -> redis.Redis:
    """The Redis of queued runs (RQ's queue, their ledger, the write locks); ``ValueError`` without REDIS_URL."""
    if not settings.redis_url:
        raise ValueError("queued runs need Redis: set REDIS_URL (redis://host:6379/0)")
    return redis_client(settings.redis_url, BLOCKING)
