"""Turn untrusted image bytes into the RGB array a browser displays.

Images come from Label Studio tasks and watched folders, so the bytes are
untrusted: the byte size, the format and the pixel count declared in the
header are all checked before any pixels are decoded, and every failure is
raised as one ``ImageError``. The array must match what Label Studio shows in
the browser, or predicted masks will not line up with the picture the
annotator sees: EXIF orientation is applied, transparency is composited over
white, and 16-bit or float greyscale is scaled to 8 bits rather than clipped.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Formats a browser can display (TIFF: Safari). Everything else Pillow knows is
# refused, e.g. EPS, whose decoding runs Ghostscript.
_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "ICO", "TIFF", "AVIF")

# What Pillow's plugins and decoders raise on malformed data.
_PILLOW_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """An image that cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds on the encoded size and the decoded pixel count."""

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 50_000_000


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode ``data`` into an HxWx3 uint8 C-contiguous RGB array.

    EXIF orientation is applied; animated images give their first frame.
    Transparent pixels are composited over a WHITE background: over black,
    transparent areas of a PNG would become dark regions the segmenter labels.
    16-bit greyscale is scaled by the full 0..65535 range (Pillow's own
    conversion clips it to white) and float greyscale by its min..max range.

    Raises ImageError for empty, oversized, unrecognised, corrupt or truncated
    data and for images declaring more than ``limits.max_pixels`` pixels.
    """
    _check_byte_size(len(data), limits)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = _identify(data)
            _check_pixel_count(image, limits)
            _decode_pixels(image)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageError(f"image too large: {_one_line(exc)}") from exc
    return _to_rgb_array(image)


def read_image_file(
    path: str | os.PathLike[str], limits: ImageLimits = ImageLimits()
) -> np.ndarray:
    """Read and decode the image file at ``path``; see ``decode_image``.

    The size is checked with ``os.stat`` before anything is read.
    """
    return read_image_data(path, limits)[1]


def read_image_data(
    path: str | os.PathLike[str], limits: ImageLimits = ImageLimits()
) -> tuple[bytes, np.ndarray]:
    """The file's bytes (what a feature cache keys it by) and their decoded image; see ``read_image_file``."""
    name = os.fspath(path)
    try:
        data = _read_bounded(name, limits)
        return data, decode_image(data, limits)
    except OSError as exc:
        raise ImageError(f"cannot read {name}: {exc.strerror or _one_line(exc)}") from exc
    except ImageError as exc:
        raise ImageError(f"{name}: {exc}") from exc


def _read_bounded(name: str, limits: ImageLimits) -> bytes:
    info = os.stat(name)
    if not stat.S_ISREG(info.st_mode):
        raise ImageError("not a regular file")
    _check_byte_size(info.st_size, limits)
    with open(name, "rb") as file:
        # One byte past the limit is enough for decode_image to refuse a file that grew.
        return file.read(limits.max_bytes + 1)


def _check_byte_size(size: int, limits: ImageLimits) -> None:
    if size == 0:
        raise ImageError("empty file")
    if size > limits.max_bytes:
        raise ImageError(f"file is {size} bytes, over the limit of {limits.max_bytes} bytes")


def _identify(data: bytes) -> Image.Image:
    """Read only the header, like ``Image.open`` restricted to ``_FORMATS``.

    ``Image.open`` applies Pillow's global decompression-bomb limit before the
    caller sees the size; opening through the format registry lets our own
    limit, with its clearer message, decide instead.
    """
    Image.init()
    prefix = data[:16]
    for name in _FORMATS:
        if name not in Image.OPEN:
            continue
        factory, accept = Image.OPEN[name]
        accepted = accept(prefix) if accept else True
        if not accepted or isinstance(accepted, str):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # Image.open also moves on to the next format here.
        except _PILLOW_ERRORS as exc:
            raise ImageError(f"corrupt {name} header: {_one_line(exc)}") from exc
    raise ImageError(f"not a recognised image (supported: {', '.join(_FORMATS)})")


def _check_pixel_count(image: Image.Image, limits: ImageLimits) -> None:
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_pixels} pixels"
        )


def _decode_pixels(image: Image.Image) -> None:
    """Decode the first frame and apply its EXIF orientation in place."""
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except _PILLOW_ERRORS as exc:
        raise ImageError(f"corrupt or truncated image: {_one_line(exc)}") from exc


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = _scale_sixteen_bit(np.asarray(image))
    elif image.mode == "F":
        grey = _scale_float(np.asarray(image))
    else:
        return np.array(_flatten(image), dtype=np.uint8)
    return np.repeat(grey[:, :, np.newaxis], 3, axis=2)


def _flatten(image: Image.Image) -> Image.Image:
    """Convert to RGB, compositing any transparency over white."""
    try:
        if not image.has_transparency_data:
            return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    except ValueError as exc:
        raise ImageError(f"unsupported image mode {image.mode}: {_one_line(exc)}") from exc


def _scale_sixteen_bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 to 0..255 with rounding: round(v * 255 / 65535) == round(v / 257)."""
    clipped = np.clip(values, 0, 65535).astype(np.uint32)
    return ((clipped + 128) // 257).astype(np.uint8)


def _scale_float(values: np.ndarray) -> np.ndarray:
    """Stretch the finite min..max range to 0..255; NaN becomes 0."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(finite.min()), float(finite.max())
    span = high - low if high > low else 1.0
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) / span
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
