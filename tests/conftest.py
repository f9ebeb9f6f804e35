"""Shared fixtures: the tiny profile, built once per test session, and real photos."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any hub client is imported: never wait on a hub

import numpy as np
import pytest
from sklearn.datasets import load_sample_image

from backend.pipeline.segmenter import Segmenter
from backend.settings import Settings


@pytest.fixture(scope="session")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(models="tiny", device="cpu", model_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_settings: Settings) -> Segmenter:
    return Segmenter.from_settings(tiny_settings)


@pytest.fixture(scope="session")
def china() -> np.ndarray:
    """scikit-learn's 640x427 photo of a Chinese temple (read-only array, as users may pass)."""
    return load_sample_image("china.jpg")
