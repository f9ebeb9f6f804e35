"""State every process of the backend must agree on: in Redis (``RedisStore``) or in files (``FileStore``).

Label Studio tells a backend some things once (``/setup`` gives a project's label config,
options, host and token) and never again with ``/predict``. With ``WORKERS=2``, several
replicas or a restart, a value held in one process's memory is a value the others never
saw, so such state lives here: a small key-value store of whole byte strings, shared by
every process that points at the same Redis or the same ``MODEL_DIR``. Values are bytes
chosen by the caller (JSON, raw arrays), never pickle.

Keys are ``namespace:name`` pairs of safe names (``projects:12``); a file store keeps one
file per key, ``<folder>/<namespace>/<name>``, readable only by its owner, since values may
hold Label Studio tokens.

Keys of the namespaces in ``expiring`` expire once unused for that many seconds: ``put`` and
``touch`` start their time again (a Redis TTL; a file's mtime, checked when it is read).

``lock(key)`` makes a read-modify-write of one key whole across processes (a project's
memory): ``SET NX PX`` with an expiry in Redis, so a crashed holder's lock lapses; ``flock``
on a lock file beside the value's file, which the kernel releases when its holder dies.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from backend.storage.redis_client import STORE_TIMEOUT_SECONDS, RedisCalls

REDIS_KEY_PREFIX = "freeseg:"
_NAME = re.compile(r"[A-Za-z0-9._-]+")
LOCK_SECONDS = 60.0  # a lock a crashed holder left behind lapses after this long (Redis)
_LOCK_POLL_SECONDS = 0.05


class StoreError(RuntimeError):
    """The shared store could not be read or written (Redis down, disk full, ...); ``kind`` is ``store``."""

    kind = "store"


class SharedStore(Protocol):
    """Whole byte values by key, the same for every process that opens the same store."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> None: ...

    def touch(self, key: str) -> None:
        """Mark the key used: when its namespace expires, its time starts again (no-op otherwise)."""
        ...

    def names(self, namespace: str, prefix: str) -> list[str]:
        """The names of the namespace's keys that start with ``prefix`` (a safe name), sorted."""
        ...

    def lock(self, key: str, seconds: float = LOCK_SECONDS) -> AbstractContextManager[None]:
        """Held by one process at a time (for a read-modify-write of ``key``); a dead holder's lapses."""
        ...


def safe_name(name: object) -> bool:
    """Whether ``name`` may name a file or end a Redis key: ``[A-Za-z0-9._-]+``, not ``.`` or ``..``.

    Project ids reach the stores as such names (the shared store's keys, the feedback log's files and
    lists), so this is the one check of them: a project that one store takes, every store takes.
    """
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and name not in (".", "..")


def checked_key(key: str) -> tuple[str, str]:
    """``(namespace, name)`` of a ``namespace:name`` key of safe names, else ``ValueError``."""
    namespace, colon, name = key.partition(":") if isinstance(key, str) else ("", "", "")
    if not colon or not (safe_name(namespace) and safe_name(name)):
        raise ValueError(f"store key must be 'namespace:name' of [A-Za-z0-9._-]+, not {key!r}")
    return namespace, name


_RELEASE_IF_OURS = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class RedisStore:
    """One Redis string per key, ``freeseg:<namespace>:<name>``; ``expiring`` namespaces' keys with a TTL."""

    def __init__(self, url: str, timeout_seconds: float = STORE_TIMEOUT_SECONDS,
                 expiring: Mapping[str, int] | None = None) -> None:
        self._redis = RedisCalls(url, timeout_seconds, "Redis store", StoreError)
        self._expiring = dict(expiring or {})

    def get(self, key: str) -> bytes | None:
        return self._redis(self._redis.client.get, self._redis_key(key))

    def put(self, key: str, value: bytes) -> None:
        self._redis(self._redis.client.set, self._redis_key(key), value, ex=self._seconds(key))

    def touch(self, key: str) -> None:
        if seconds := self._seconds(key):
            self._redis(self._redis.client.expire, self._redis_key(key), seconds)

    def _seconds(self, key: str) -> int | None:
        return self._expiring.get(checked_key(key)[0]) or None

    def delete(self, key: str) -> None:
        self._redis(self._redis.client.delete, self._redis_key(key))

    def names(self, namespace: str, prefix: str) -> list[str]:
        start = self._redis_key(f"{namespace}:{prefix}")  # checks both; safe names hold no glob characters
        keys = self._redis(lambda: [key.decode() for key in self._redis.client.scan_iter(match=start + "*")])
        return sorted(name for key in keys if ":" not in (name := key.removeprefix(f"{REDIS_KEY_PREFIX}{namespace}:")))

    @contextmanager
    def lock(self, key: str, seconds: float = LOCK_SECONDS) -> Iterator[None]:
        """SET NX PX with a token of ours: waits for the holder; released only if still ours."""
        name, token = self._redis_key(key) + ":lock", uuid.uuid4().hex
        while not self._redis(self._redis.client.set, name, token, nx=True, px=int(seconds * 1000)):
            time.sleep(_LOCK_POLL_SECONDS)
        try:
            yield
        finally:
            self._redis(self._redis.client.eval, _RELEASE_IF_OURS, 1, name, token)

    @staticmethod
    def _redis_key(key: str) -> str:
        checked_key(key)
        return REDIS_KEY_PREFIX + key


class FileStore:
    """One file per key under ``folder``; writes replace the file whole (write, then rename).

    A file of an ``expiring`` namespace older (mtime) than its seconds is deleted when read.
    """

    def __init__(self, folder: Path, expiring: Mapping[str, int] | None = None) -> None:
        self.folder = Path(folder)
        self._expiring = dict(expiring or {})

    def path(self, key: str) -> Path:
        namespace, name = checked_key(key)
        return self.folder / namespace / name

    def get(self, key: str) -> bytes | None:
        path = self.path(key)
        seconds = self._expiring.get(checked_key(key)[0])
        try:
            if seconds and time.time() - path.stat().st_mtime > seconds:
                path.unlink(missing_ok=True)
                return None
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StoreError(f"cannot read {path} (MODEL_DIR): {error}") from error

    def touch(self, key: str) -> None:
        path = self.path(key)
        if not self._expiring.get(checked_key(key)[0]):
            return
        try:
            os.utime(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise StoreError(f"cannot touch {path} (MODEL_DIR): {error}") from error

    def put(self, key: str, value: bytes) -> None:
        path = self.path(key)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkstemp creates the file readable only by its owner; the rename makes the write all or nothing.
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(value)
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as error:
            raise StoreError(f"cannot write {path} (MODEL_DIR): {error}") from error

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise StoreError(f"cannot delete {path} (MODEL_DIR): {error}") from error

    def names(self, namespace: str, prefix: str) -> list[str]:
        folder = self.path(f"{namespace}:{prefix}").parent  # checks both
        try:
            return sorted(path.name for path in folder.glob(f"{prefix}*") if not path.name.startswith("."))
        except OSError as error:
            raise StoreError(f"cannot list {folder} (MODEL_DIR): {error}") from error

    @contextmanager
    def lock(self, key: str, seconds: float = LOCK_SECONDS) -> Iterator[None]:
        """``flock`` on ``<folder>/<namespace>/.<name>.lock``: the kernel releases it when its holder dies."""
        path = self.path(key)
        lock_path = path.with_name(f".{path.name}.lock")
        try:
            lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise StoreError(f"cannot lock {path} (MODEL_DIR): {error}") from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)  # releases the lock

