"""The Encoding: everything about an image that does not depend on the labels.

It is what ``encode`` computes once and ``segment`` reuses for any label set, K or
prompt, and what the feature cache stores. It travels as safetensors bytes (arrays plus
string metadata): no pickle, so bytes from Redis or a network cannot run code.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

FORMAT_VERSION = "1"


class EncodingFormatError(ValueError):
    """Bytes that are not an Encoding of this format version."""


@dataclass(frozen=True)
class Encoding:
    features: np.ndarray  # (C, G, G) float16 U-Net feature grid
    image_embedding: np.ndarray  # (D,) float32 unit-norm CLIP embedding of the whole image
    caption: str
    width: int  # of the image as displayed (EXIF orientation applied)
    height: int
    fingerprint: str  # of the models and feature settings that made it

    def to_bytes(self) -> bytes:
        metadata = {
            "format": FORMAT_VERSION,
            "caption": self.caption,
            "width": str(self.width),
            "height": str(self.height),
            "fingerprint": self.fingerprint,
        }
        arrays = {"features": np.ascontiguousarray(self.features), "image_embedding": self.image_embedding}
        return save_tensors(arrays, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> Encoding:
        try:
            arrays = load_tensors(data)
            metadata = read_safetensors_metadata(data)
            if metadata.get("format") != FORMAT_VERSION:
                raise EncodingFormatError(f"encoding format {metadata.get('format')!r}, expected {FORMAT_VERSION}")
            return cls(
                features=arrays["features"],
                image_embedding=arrays["image_embedding"],
                caption=metadata["caption"],
                width=int(metadata["width"]),
                height=int(metadata["height"]),
                fingerprint=metadata["fingerprint"],
            )
        except EncodingFormatError:
            raise
        except Exception as error:  # safetensors raises its own types for malformed bytes
            raise EncodingFormatError(f"not an encoding: {error}") from error


def read_safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (the numpy loader returns arrays only)."""
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_length])
    return header.get("__metadata__", {})
