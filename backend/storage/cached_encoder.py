"""Encodings through the feature cache: an image is encoded once, whoever asks for it.

The server's predictions and learning, ``freesegdiff learn`` and the project and folder jobs all
encode through a ``CachedEncoder``: keyed by the image's bytes and the models' fingerprint
(``cache_key``), so with REDIS_URL set they share one cache, and an image the server encoded
is not encoded again by a job (nor the other way round). The encode function is the caller's:
the server's inference worker, batched across requests, or the process's segmenter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import NamedTuple, Protocol

import numpy as np

from backend.pipeline.encoding import Encoding
from backend.pipeline.segmenter import Segmenter
from backend.settings import Settings
from backend.storage.backing import shared_feature_cache
from backend.storage.feature_cache import FeatureCache, cache_key

BatchEncode = Callable[[list[np.ndarray]], list[Encoding]]  # images to their encodings, in order


class Fingerprinted(Protocol):
    """What names the models' encodings (a Segmenter, or the server's inference worker once loaded)."""

    @property
    def fingerprint(self) -> str: ...


class Encoded(NamedTuple):
    encodings: list[Encoding]
    computed: int  # how many of them were not in the cache


class CachedEncoder:
    """``encode`` behind ``cache`` (None: no cache); new encodings are handed to ``keep`` (default: the cache's put,
    the server's: its background writer)."""

    def __init__(self, cache: FeatureCache | None, models: Fingerprinted, encode: BatchEncode,
                 keep: Callable[[str, Encoding], None] | None = None) -> None:
        self.cache, self.models, self._encode = cache, models, encode
        self._keep = keep or (cache.put if cache is not None else None)

    def encode(self, image_bytes: bytes, pixels: np.ndarray) -> Encoding:
        """The encoding of the image whose file is ``image_bytes`` and whose decoded pixels are ``pixels``."""
        return self.encode_batch([(image_bytes, pixels)]).encodings[0]

    def encode_batch(self, images: Sequence[tuple[bytes, np.ndarray]]) -> Encoded:
        """The images' encodings, in order; those not in the cache are encoded in one call."""
        if self.cache is None:
            return Encoded(self._encode([pixels for _, pixels in images]), len(images))
        keys = [cache_key(data, self.models.fingerprint) for data, _ in images]
        found = [self.cache.get(key) for key in keys]
        missing = [index for index, encoding in enumerate(found) if encoding is None]
        if missing:
            for index, encoding in zip(missing, self._encode([images[index][1] for index in missing]), strict=True):
                found[index] = encoding
                self._keep(keys[index], encoding)
        return Encoded(found, len(missing))


def segmenter_encoder(segmenter: Segmenter, cache: FeatureCache | None) -> CachedEncoder:
    """The segmenter's encodings through ``cache``; a batch that runs out of GPU memory is encoded in halves."""
    return CachedEncoder(cache, segmenter, lambda images: segmenter.encode_many(images, len(images)))


@lru_cache(maxsize=2)
def one_pass_cache(settings: Settings) -> FeatureCache | None:
    """The feature cache of a process that encodes each image once (``learn``, the jobs): Redis's when REDIS_URL is
    set (the server's entries, and every worker's; one client per process), else none: an in-process cache would
    only hold memory and cost a serialization per image."""
    return shared_feature_cache(settings)
