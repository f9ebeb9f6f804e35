"""Whether the captioner's engine writes torch eager's captions: the same token ids, photo by photo.

Random weights (the random-full profile) write nonsense, so meaning cannot be compared, but the tokens can: an
engine that computes the same function picks the same beam at each step. The photos are a folder's JPEG and PNG
files (VOC's ``JPEGImages/`` inside it when there is one), each captioned alone, as a prediction does.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from backend.images import read_image_file
from backend.models.caption_engines import caption_engine
from backend.pipeline.caption import Captioner
from backend.pipeline.parts import CaptionerParts

SUFFIXES = {".jpg", ".jpeg", ".png"}


def photo_paths(folder: Path) -> list[Path]:
    """The photos of ``folder``, or of its VOC-style ``JPEGImages/``, in name order."""
    images = folder / "JPEGImages"
    source = images if images.is_dir() else folder
    return sorted(path for path in source.iterdir() if path.suffix.lower() in SUFFIXES)


def caption_agreement(captioner: Captioner, eager_parts: CaptionerParts, photos: list[np.ndarray]) -> dict:
    """How many photos get the same caption tokens from ``captioner`` as from ``eager_parts`` (the same captioner
    loaded on torch eager: an engine's model keeps no torch weights), and each engine's median time per caption
    (one photo at a time, the engines taking turns)."""
    eager = copy.copy(captioner)
    eager.model = eager_parts.model
    captioners = {"torch": eager, caption_engine(captioner.model): captioner}
    for each in captioners.values():
        each.token_ids(photos[:1])  # warm-up: first calls allocate and tune
    seconds: dict[str, list[float]] = {name: [] for name in captioners}
    same = 0
    for photo in photos:
        tokens = []
        for name, each in captioners.items():
            start = time.perf_counter()
            tokens.append(each.token_ids([photo])[0])
            seconds[name].append(time.perf_counter() - start)
        same += int(torch.equal(tokens[0], tokens[-1]))
    return {"images": len(photos), "same": same, "share": same / len(photos) if photos else 0.0,
            "engine": caption_engine(captioner.model),
            "caption_ms": {name: 1000 * statistics.median(values) for name, values in seconds.items()}}


def folder_agreement(captioner: Captioner, eager_parts: CaptionerParts, folder: Path) -> dict:
    """``caption_agreement`` on the photos of ``folder`` (``photo_paths``)."""
    return caption_agreement(captioner, eager_parts, [read_image_file(path) for path in photo_paths(folder)])
