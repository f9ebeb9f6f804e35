"""Parsed label configs by their text, bounded in bytes.

Every /predict carries the project's label config again, so each distinct config is parsed
once. A config may be as large as a request (FREESEG_MAX_REQUEST_BYTES), so a bound by count
(256 of them) let 20 configs of 4.5 MB add 181 MB: the bound is on the configs' size instead.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable

from backend.labelstudio.config import ProjectVocabulary


class LabelConfigCache:
    """``parse`` of a config, kept for the configs used last, at most ``max_bytes`` of their text in all.

    The text is what a cached config costs (its parsed vocabulary holds a part of it); a config larger
    than ``max_bytes`` is parsed every time, not kept. Refused configs are not kept: they raise each time.
    """

    def __init__(self, parse: Callable[[str], ProjectVocabulary], max_bytes: int) -> None:
        self.parse, self.max_bytes = parse, max_bytes
        self._parsed: OrderedDict[str, ProjectVocabulary] = OrderedDict()  # least recently used first
        self._held_bytes = 0
        self._lock = threading.Lock()

    def __call__(self, label_config: str) -> ProjectVocabulary:
        with self._lock:
            vocabulary = self._parsed.get(label_config)
            if vocabulary is not None:
                self._parsed.move_to_end(label_config)
                return vocabulary
        vocabulary = self.parse(label_config)
        self._keep(label_config, vocabulary)
        return vocabulary

    @property
    def held_bytes(self) -> int:
        """Bytes of the config texts held now."""
        with self._lock:
            return self._held_bytes

    def _keep(self, label_config: str, vocabulary: ProjectVocabulary) -> None:
        size = sys.getsizeof(label_config)
        with self._lock:
            if size > self.max_bytes or label_config in self._parsed:
                return
            self._parsed[label_config] = vocabulary
            self._held_bytes += size
            while self._held_bytes > self.max_bytes:
                dropped, _ = self._parsed.popitem(last=False)
                self._held_bytes -= sys.getsizeof(dropped)
