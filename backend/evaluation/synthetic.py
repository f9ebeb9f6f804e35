"""Synthetic labelled scenes: regions of distinct colours and textures, with exact ground truth.

Each scene is a textured background with a few shapes (ellipses, rectangles, bands) of
random classes laid over it, later shapes over earlier ones. Every class has its own colour
and texture (stripes, checks, dots, blotches), so what a class looks like is learnable from a
few scenes, while its name means nothing to a model. Written as a labelled folder
(``datasets.folder_dataset``): ``classes.txt``, ``images/<id>.png``, ``labels/<id>.png``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# Class 0 is the background; the others are words CLIP barely knows, as in real closed vocabularies.
CLASSES = ("background", "weld seam", "rust", "crop row", "lesion")
COLOURS = ((120, 120, 125), (200, 200, 70), (170, 80, 30), (60, 140, 60), (190, 60, 120))


def texture(class_id: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 texture of a class: its colour modulated by its own pattern, plus noise."""
    rows, columns = np.mgrid[:height, :width]
    phase = rng.uniform(0, 2 * np.pi)
    patterns = (
        np.zeros((height, width)),  # background: flat, noisy
        np.sin(rows / 2.0 + phase),  # weld seam: fine horizontal stripes
        cv2.GaussianBlur(rng.normal(size=(height, width)), (0, 0), 3) * 3,  # rust: blotches
        np.sign(np.sin((rows + columns) / 4.0 + phase)),  # crop row: diagonal bands
        np.sign(np.sin(rows / 3.0 + phase) * np.sin(columns / 3.0)),  # lesion: checks
    )
    shade = 1.0 + 0.25 * np.clip(patterns[class_id], -1, 1)[..., None]
    noisy = np.asarray(COLOURS[class_id]) * shade + rng.normal(scale=6.0, size=(height, width, 3))
    return np.clip(noisy, 1, 255).astype(np.uint8)  # no pure black: black means "masked out" to CLIP


def scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) image and its (H, W) class-id label map."""
    truth = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        class_id = int(rng.integers(1, len(CLASSES)))
        shape = np.zeros((height, width), np.uint8)
        centre = (int(rng.integers(width // 5, 4 * width // 5)), int(rng.integers(height // 5, 4 * height // 5)))
        size = (int(rng.integers(width // 8, width // 3)), int(rng.integers(height // 8, height // 3)))
        kind = int(rng.integers(3))
        if kind == 0:
            cv2.ellipse(shape, centre, size, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        elif kind == 1:
            cv2.rectangle(shape, (centre[0] - size[0], centre[1] - size[1]), (centre[0] + size[0], centre[1] + size[1]), 1, -1)
        else:
            cv2.line(shape, (0, centre[1]), (width - 1, int(rng.integers(height))), 1, max(size[1] // 2, 3))
        truth[shape > 0] = class_id
    image = np.zeros((height, width, 3), np.uint8)
    for class_id in range(len(CLASSES)):
        where = truth == class_id
        if where.any():
            image[where] = texture(class_id, height, width, rng)[where]
    return image, truth


def write_scenes(root: Path, count: int, seed: int = 0, height: int = 192, width: int = 256) -> Path:
    """Write ``count`` scenes as a labelled folder under ``root``; the same seed gives the same files."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rng = np.random.default_rng(seed)
    for index in range(count):
        image, truth = scene(rng, height, width)
        Image.fromarray(image).save(root / "images" / f"scene-{index:04d}.png")
        Image.fromarray(truth, mode="L").save(root / "labels" / f"scene-{index:04d}.png")
    return root
