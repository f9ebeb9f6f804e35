"""The numpy brush RLE gives exactly the bytes of label_studio_sdk's mask2rle, and decodes back."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from backend.labelstudio.rle import brush_rle


def sdk_rle(mask: np.ndarray) -> list[int]:
    return [int(v) for v in mask2rle(np.where(mask, 255, 0).astype(np.uint8))]


def masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    long_runs = np.zeros((400, 500), bool)  # runs of 4 x 100,000 values: several 65,536-value pieces
    long_runs[200:] = True
    long_runs[300, 7] = False
    rectangle = np.zeros((60, 90), bool)
    rectangle[10:50, 5:70] = True
    return [np.zeros((3, 5), bool), np.ones((7, 3), bool), rng.random((40, 50)) > 0.5, rng.random((33, 47)) > 0.95,
            rectangle, long_runs, np.ones((1, 1), bool)]


@pytest.mark.parametrize("mask", masks(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_the_bytes_of_the_sdk_encoder(mask):
    rle = brush_rle(mask)
    assert rle == sdk_rle(mask)
    decoded = np.reshape(decode_rle(rle), mask.shape + (4,))[:, :, 3] > 0
    assert np.array_equal(decoded, mask)
