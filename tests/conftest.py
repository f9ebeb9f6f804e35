"""Shared fixtures: the tiny profile, built once per test session, and real photos."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any hub client is imported: never wait on a hub
# The same on every machine, and in the processes tests start: float32 (on a CPU with bfloat16, auto picks it, and
# its batched kernels round differently from one image's), the torch engines (tests of the others ask for them;
# the captioner's OpenVINO conversion would cost every fresh MODEL_DIR about 20 s).
os.environ.setdefault("FREESEG_DTYPE", "float32")
os.environ.setdefault("FREESEG_ENGINE", "torch")
os.environ.setdefault("FREESEG_CAPTION_ENGINE", "torch")

import numpy as np
import pytest
from sklearn.datasets import load_sample_image

from backend.pipeline.segmenter import Segmenter
from backend.models.process import process_segmenter
from tests.http_server import RecordingServer, serving
from tests.redis_server import REDIS_SERVER, RedisServer
from backend.settings import Settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every end-to-end test is slow: each needs the session's Label Studio server."""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # the test image server is on 127.0.0.1, a private address
    return Settings(models="tiny", device="cpu", model_dir=tmp_path_factory.mktemp("models"), allow_private_urls=True)


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_settings: Settings) -> Segmenter:
    return process_segmenter(tiny_settings)


@pytest.fixture()
def tiny_environment(monkeypatch: pytest.MonkeyPatch, tiny_settings: Settings) -> Iterator[pytest.MonkeyPatch]:
    """The environment of a user of the tiny profile, for the CLI's own ``get_settings()``; more can be set."""
    from backend.settings import get_settings

    for name, value in {"FREESEG_MODELS": "tiny", "MODEL_DIR": str(tiny_settings.model_dir),
                        "FREESEG_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def china() -> np.ndarray:
    """scikit-learn's 640x427 photo of a Chinese temple (read-only array, as users may pass)."""
    return load_sample_image("china.jpg")


@pytest.fixture
def http_server() -> Iterator[RecordingServer]:
    """A loopback server for the test's routes, recording every request (tests/http_server.py)."""
    with RecordingServer() as server:
        yield server


@pytest.fixture(scope="session")
def image_server() -> Iterator[str]:
    """The URL of a loopback server of test images: china.jpg, flower.jpg and a corrupt file."""
    from pathlib import Path

    import sklearn

    photos = Path(sklearn.__file__).parent / "datasets" / "images"
    with RecordingServer() as server:
        for name in ("china.jpg", "flower.jpg"):
            server.routes[f"/{name}"] = serving((photos / name).read_bytes(), "image/jpeg")
        server.routes["/corrupt.jpg"] = serving(b"\xff\xd8\xff\xe0 definitely not a whole jpeg", "image/jpeg")
        yield server.url


@pytest.fixture(scope="session")
def start_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """Starts redis-server processes, all stopped at the end of the session.

    Skipped when redis-server is missing, unless CI is set: then missing it is a failure.
    """
    if REDIS_SERVER is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI is set: the Redis cache tests must run")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    servers: list[RedisServer] = []

    def start(password: str | None = None, append_only: bool = False) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), password, append_only)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(start_redis: Callable[..., RedisServer]) -> RedisServer:
    return start_redis()
