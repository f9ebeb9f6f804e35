"""The overlay a person looks at first: the image, coloured masks and a legend."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from backend.pipeline.segmenter import Segmentation

# Distinct colours (Tableau 10 and its light variants), cycled for long label lists.
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
], dtype=np.uint8)
MASK_OPACITY = 0.5


def label_colour(label: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in PALETTE[label % len(PALETTE)])


def render_overlay(image: np.ndarray, segmentation: Segmentation, warning: str | None = None) -> Image.Image:
    """The image with each region tinted in its label's colour, and a legend below it."""
    tinted = image.astype(np.float32)
    for region in segmentation.regions:
        mask = segmentation.region_mask(region)
        tinted[mask] = (1 - MASK_OPACITY) * tinted[mask] + MASK_OPACITY * PALETTE[region.label % len(PALETTE)]
    picture = Image.fromarray(tinted.round().astype(np.uint8))
    font = ImageFont.load_default(size=max(12, picture.width // 45))
    lines = [(f"{r.name}  {r.score:.2f}", label_colour(r.label)) for r in segmentation.regions]
    if not lines:
        lines = [("no labelled region", (255, 255, 255))]
    if warning:
        lines.insert(0, (warning, (255, 80, 80)))
    line_height = int(font.size * 1.5)
    canvas = Image.new("RGB", (picture.width, picture.height + line_height * len(lines) + 8), (20, 20, 20))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (text, colour) in enumerate(lines):
        top = picture.height + 4 + row * line_height
        draw.rectangle((6, top + 2, 6 + font.size, top + 2 + font.size), fill=colour)
        draw.text((12 + font.size, top), text, fill=(240, 240, 240), font=font)
    return canvas


def label_index_image(label_map: np.ndarray) -> Image.Image:
    """The label map as a PNG-ready image: 8-bit when the labels fit, else 16-bit."""
    if label_map.max(initial=0) < 256:
        return Image.fromarray(label_map.astype(np.uint8))
    return Image.fromarray(label_map.astype(np.uint16))
