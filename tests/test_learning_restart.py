"""Learning events outlive a killed server: a real ``freesegdiff serve`` killed with SIGKILL while an
accepted event could not be applied yet (Label Studio answering 503) applies it after the restart, with
the queue in files under MODEL_DIR and in a real redis-server. Label Studio is ``tests.fake_labelstudio``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.fake_labelstudio import TOKEN
from tests.redis_server import free_port
from tests.test_learning_durable import _wait_ready
from tests.test_learning_server import _annotation, fake  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _serve(port: int, environment: dict[str, str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("a") as output:
        return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("store", ["files", "redis"])
def test_an_event_accepted_before_a_kill_is_learned_after_the_restart(store, tiny_settings, tiny_segmenter, fake,
                                                                       start_redis, tmp_path):
    model_dir = tmp_path / "models"  # the tiny models, and (files) the store
    model_dir.mkdir()
    for entry in tiny_settings.model_dir.iterdir():
        (model_dir / entry.name).symlink_to(entry)
    environment = {**os.environ, "FREESEG_MODELS": "tiny", "FREESEG_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
                   "MODEL_DIR": str(model_dir), "FREESEG_CRF_PROCESSES": "0", "OMP_NUM_THREADS": "1",
                   "LOG_LEVEL": "WARNING", "LABEL_STUDIO_URL": fake.url, "LABEL_STUDIO_API_KEY": TOKEN,
                   "FREESEG_ALLOW_PRIVATE_URLS": "true", "FREESEG_LABELSTUDIO_ATTEMPTS": "1",
                   "FREESEG_LABELSTUDIO_BACKOFF_SECONDS": "0.2"}
    environment.pop("REDIS_URL", None)
    redis = start_redis() if store == "redis" else None
    if redis is not None:
        environment["REDIS_URL"] = redis.url

    def queued() -> int:
        if redis is None:
            return len([path for path in (model_dir / "learning").glob("e*")])
        with redis.client() as client:
            return len(client.keys("freeseg:learning:*"))

    tried = threading.Event()
    answer = fake.answer

    def unavailable(path: str) -> tuple[int, object]:  # Label Studio restarting: the event cannot be applied
        tried.set()
        return 503, {"detail": "restarting"}

    fake.answer = unavailable
    port, log = free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    process = _serve(port, environment, log)
    try:
        _wait_ready(base, 240)
        accepted = requests.post(f"{base}/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                                          **_annotation(100, 10, [])}, timeout=30)
        assert accepted.status_code == 200
        assert tried.wait(60), log.read_text()  # the learner took it from the queue and could not apply it
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        assert queued() == 1
        fake.answer = answer
        process = _serve(port, environment, log)
        _wait_ready(base, 240)
        deadline = time.monotonic() + 120
        while (shown := requests.get(f"{base}/memory/1", timeout=30)).status_code == 404 or queued():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert [item["annotation"] for item in shown.json()["annotations"]] == ["100"]
    finally:
        process.kill()
        process.wait(30)
