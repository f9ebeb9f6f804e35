"""Cache writes off the request path, bounded.

Serializing and sending an encoding costs about 0.2 s of CPU; a GPU encodes faster than
that. Writes go to one background thread through a bounded queue, and when it is full a
write is skipped (counted) rather than slowing predictions or holding encodings in memory.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from backend.storage.feature_cache import FeatureCache
from backend.pipeline.encoding import Encoding

log = logging.getLogger(__name__)


class CacheWriter:
    def __init__(self, cache: FeatureCache, capacity: int, on_skip: Callable[[], None] = lambda: None):
        self.cache, self.on_skip = cache, on_skip
        self._writes: queue.Queue[tuple[str, Encoding] | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def put(self, key: str, encoding: Encoding) -> None:
        try:
            self._writes.put_nowait((key, encoding))
        except queue.Full:
            self.on_skip()

    def flush(self) -> None:
        """Wait until every queued write is done."""
        self._writes.join()

    def stop(self) -> None:
        self._writes.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (item := self._writes.get()) is not None:
            try:
                self.cache.put(*item)
            except Exception:  # the caches swallow their own errors; anything else must not kill the writer
                log.exception("feature cache write failed")
            finally:
                self._writes.task_done()
        self._writes.task_done()
