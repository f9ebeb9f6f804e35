"""Tests for backend.images: every input is built in memory with Pillow."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.images import ImageError, ImageLimits, decode_image, read_image_file

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def assert_rgb_array(array: np.ndarray, height: int, width: int) -> None:
    assert array.shape == (height, width, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous


def close_to(pixel: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - np.array(colour)) <= tolerance))


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to declare width x height."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def gif_with_frame(width: int, height: int) -> bytes:
    """A 1x1 GIF whose first frame is patched to be width x height."""
    data = encode(Image.new("P", (1, 1)), "GIF")
    descriptor = b",\x00\x00\x00\x00\x01\x00\x01\x00"
    assert data.count(descriptor) == 1
    patched = b",\x00\x00\x00\x00" + struct.pack("<HH", width, height)
    return data.replace(descriptor, patched)


# --- shapes and formats -----------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_rgb_round_trip_keeps_height_width_order(fmt: str) -> None:
    image = Image.new("RGB", (64, 48), BLUE)
    image.paste(RED, (0, 0, 64, 8))  # top band red

    array = decode_image(encode(image, fmt))

    assert_rgb_array(array, 48, 64)
    assert close_to(array[2, 32], RED)
    assert close_to(array[40, 32], BLUE)


def test_png_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7, 13, 3), dtype=np.uint8)

    array = decode_image(encode(Image.fromarray(pixels), "PNG"))

    np.testing.assert_array_equal(array, pixels)


def test_exif_orientation_6_rotates_clockwise() -> None:
    image = Image.new("RGB", (40, 20), BLUE)  # stored 40 wide, 20 high
    image.paste(RED, (0, 0, 8, 8))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)

    array = decode_image(data)

    assert_rgb_array(array, 40, 20)
    # Clockwise rotation carries the top-left corner to the top-right.
    assert close_to(array[3, 16], RED)
    assert close_to(array[3, 3], BLUE)
    assert close_to(array[36, 16], BLUE)


def test_greyscale_becomes_equal_channels() -> None:
    image = Image.new("L", (5, 3), 77)

    array = decode_image(encode(image, "PNG"))

    assert_rgb_array(array, 3, 5)
    assert np.all(array == 77)


def test_palette_becomes_rgb() -> None:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([*RED, *BLUE])
    image.putpixel((3, 1), 1)

    array = decode_image(encode(image, "PNG"))

    assert_rgb_array(array, 2, 4)
    assert tuple(array[0, 0]) == RED
    assert tuple(array[1, 3]) == BLUE


def test_palette_transparency_is_composited_over_white() -> None:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([*RED, *BLUE])
    image.putpixel((3, 1), 1)

    array = decode_image(encode(image, "GIF", transparency=1))

    assert tuple(array[0, 0]) == RED
    assert tuple(array[1, 3]) == (255, 255, 255)


def test_rgba_is_composited_over_white() -> None:
    image = Image.new("RGBA", (3, 1), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((1, 0), (*RED, 255))
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black

    array = decode_image(encode(image, "PNG"))

    assert_rgb_array(array, 1, 3)
    assert tuple(array[0, 0]) == (255, 255, 255)
    assert tuple(array[0, 1]) == RED
    assert np.all(np.abs(array[0, 2].astype(int) - 127) <= 1)


def test_greyscale_with_alpha_is_composited_over_white() -> None:
    image = Image.new("LA", (2, 1), (10, 0))
    image.putpixel((1, 0), (10, 255))

    array = decode_image(encode(image, "PNG"))

    assert tuple(array[0, 0]) == (255, 255, 255)
    assert tuple(array[0, 1]) == (10, 10, 10)


def test_cmyk_jpeg_becomes_rgb() -> None:
    image = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # full magenta + yellow = red
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"

    array = decode_image(data)

    assert_rgb_array(array, 8, 16)
    assert close_to(array[4, 8], RED, tolerance=10)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    opened = Image.open(io.BytesIO(data))
    assert opened.mode.startswith("I")
    # Pillow's own conversion clips: anything above 255 becomes white.
    assert np.array(opened.convert("RGB"))[0, 2, 0] == 255

    array = decode_image(data)

    assert_rgb_array(array, 1, 4)
    np.testing.assert_array_equal(array[0, :, 0], [0, 1, 128, 255])
    assert np.all(array[..., 0] == array[..., 1])
    assert np.all(array[..., 0] == array[..., 2])


def test_big_endian_sixteen_bit_tiff_is_scaled() -> None:
    values = np.array([[0, 32768, 65535]], dtype=">u2")
    image = Image.frombytes("I;16B", (3, 1), values.tobytes())

    array = decode_image(encode(image, "TIFF"))

    np.testing.assert_array_equal(array[0, :, 0], [0, 128, 255])


def test_float_tiff_is_scaled_by_its_range() -> None:
    values = np.array([[-1.0, 0.0, 3.0]], dtype=np.float32)

    array = decode_image(encode(Image.fromarray(values), "TIFF"))

    np.testing.assert_array_equal(array[0, :, 0], [0, 64, 255])


def test_one_bit_becomes_black_and_white() -> None:
    image = Image.new("1", (3, 2), 0)
    image.putpixel((2, 1), 1)

    array = decode_image(encode(image, "PNG"))

    assert_rgb_array(array, 2, 3)
    assert tuple(array[0, 0]) == (0, 0, 0)
    assert tuple(array[1, 2]) == (255, 255, 255)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (6, 4), RED), Image.new("RGB", (6, 4), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2

    array = decode_image(data)

    assert_rgb_array(array, 4, 6)
    assert tuple(array[0, 0]) == RED


# --- errors -----------------------------------------------------------------


def test_empty_data_is_refused() -> None:
    with pytest.raises(ImageError, match="^empty file$"):
        decode_image(b"")


def test_random_bytes_are_refused() -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not a recognised image"):
        decode_image(data)


def test_format_a_browser_cannot_show_is_refused() -> None:
    data = encode(Image.new("RGB", (4, 4)), "PPM")
    with pytest.raises(ImageError, match="not a recognised image"):
        decode_image(data)


def test_truncated_jpeg_is_refused() -> None:
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")

    with pytest.raises(ImageError, match="truncated|corrupt") as caught:
        decode_image(data[: len(data) // 2])

    assert "\n" not in str(caught.value)


def test_declared_pixel_count_is_refused_before_decoding() -> None:
    data = png_declaring(30000, 30000)
    with pytest.raises(Image.DecompressionBombError):  # the CRC is valid: Pillow parses it
        Image.open(io.BytesIO(data))
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()

    with pytest.raises(ImageError) as caught:
        decode_image(data)

    assert time.perf_counter() - start < 1.0
    message = str(caught.value)
    assert "30000x30000" in message
    assert str(ImageLimits().max_pixels) in message
    assert Image.MAX_IMAGE_PIXELS == max_pixels_before


def test_pixel_limit_is_ours_not_pillows() -> None:
    data = encode(Image.new("RGB", (100, 60)), "PNG")

    with pytest.raises(ImageError, match=r"100x60 = 6000 pixels.*5999"):
        decode_image(data, ImageLimits(max_pixels=5999))
    assert decode_image(data, ImageLimits(max_pixels=6000)).shape == (60, 100, 3)


@pytest.mark.parametrize("side", [10_000, 20_000])  # Pillow warns, then errors
def test_pillow_decompression_bomb_checks_become_image_errors(side: int) -> None:
    # GIF frames larger than the screen trip Pillow's own check while opening.
    limits = ImageLimits(max_pixels=10**9)

    with pytest.raises(ImageError, match="too large"):
        decode_image(gif_with_frame(side, side), limits)


def test_data_over_max_bytes_is_refused() -> None:
    data = encode(Image.new("RGB", (8, 8)), "PNG")
    limit = len(data) - 1

    with pytest.raises(ImageError, match=rf"{len(data)} bytes.*limit of {limit} bytes"):
        decode_image(data, ImageLimits(max_bytes=limit))


# --- files ------------------------------------------------------------------


def test_read_image_file(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(encode(Image.new("RGB", (5, 9), RED), "PNG"))

    array = read_image_file(path)

    assert_rgb_array(array, 9, 5)
    assert tuple(array[0, 0]) == RED


def test_read_image_file_checks_size_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(b"\0" * 100)

    def forbidden_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was opened")

    monkeypatch.setattr("builtins.open", forbidden_open)
    with pytest.raises(ImageError, match=r"big\.png.*100 bytes.*limit of 99 bytes"):
        read_image_file(path, ImageLimits(max_bytes=99))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.jpg"

    with pytest.raises(ImageError, match=r"missing\.jpg") as caught:
        read_image_file(path)

    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a regular file"):
        read_image_file(tmp_path)


def test_decode_errors_from_files_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")

    with pytest.raises(ImageError, match=r"empty\.png: empty file"):
        read_image_file(path)
