"""Points between the frames of one image: Label Studio's percent of its width and height, the pixels of
the image as displayed, and the pixels of its working copy (``upsampling.working_image``). Every conversion
goes through ``to_frame``, so all of them scale the same way."""

from __future__ import annotations

Frame = tuple[float, float]  # a frame's (width, height), in its own units
PERCENT: Frame = (100.0, 100.0)  # Label Studio's frame: x and y in percent of the image's width and height


def to_frame(x: float, y: float, source: Frame, target: Frame) -> tuple[float, float]:
    """The point (x, y) of the frame ``source`` in the frame ``target`` over the same image."""
    return x * target[0] / source[0], y * target[1] / source[1]
