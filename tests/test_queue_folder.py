"""annotate-folder --queue: the images of a folder segmented by two real ``freesegdiff worker --burst``
processes through a real redis-server, giving the very files of the in-process run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
import sklearn
from rq import Queue
from rq.serializers import JSONSerializer

from backend.jobs.folder import FolderRun, annotate_folder, url_prefix_reference
from backend.storage.job_ledger import RedisLedger
from backend.options import SegmentOptions
from backend.models.identity import model_version
from backend.pipeline.vocabulary import labels_from_names
from tests.queue_workers import REPO_ROOT, log_text, queue_env, start_worker, stop, wait_until

pytestmark = pytest.mark.slow  # real worker processes

SAMPLES = Path(sklearn.__file__).parent / "datasets" / "images"
LABELS = "building,flower,sky"
PREFIX = "https://images.example/"


def photos(folder: Path) -> Path:
    """Four photos (one in a subfolder, one with a space in its name) and a corrupt PNG."""
    (folder / "more").mkdir(parents=True)
    shutil.copy(SAMPLES / "china.jpg", folder / "a china.jpg")
    shutil.copy(SAMPLES / "flower.jpg", folder / "b.jpg")
    shutil.copy(SAMPLES / "flower.jpg", folder / "more" / "c.jpg")
    shutil.copy(SAMPLES / "china.jpg", folder / "more" / "d.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def run_of(connection: redis.Redis, out: Path) -> str:
    """The id of the run that wrote ``out``."""
    return next(run for run in RedisLedger.recent(connection, 50)
                if RedisLedger(connection, run).fields().get("target") == str(out.resolve()))


def test_two_workers_write_the_files_of_the_in_process_run(tmp_path, tiny_settings, tiny_segmenter, redis_server):
    folder = photos(tmp_path / "photos")
    options = SegmentOptions(k=3, refine="none", use_caption=False)
    run = FolderRun(folder, tmp_path / "local", tuple(labels_from_names(LABELS.split(","))), options)
    annotate_folder(run, tiny_segmenter, model_version(tiny_settings), url_prefix_reference(PREFIX, folder),
                    progress=False)

    queue_name = f"test-folder-{uuid.uuid4().hex[:8]}"
    env = queue_env(tiny_settings.model_dir, redis_server.url, queue_name, FREESEG_QUEUE_CHUNK_SIZE="1")
    out = tmp_path / "queued"
    enqueuer = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "annotate-folder", str(folder), "--labels", LABELS, "--out", str(out),
         "--image-root-url", PREFIX, "--no-caption", "--k", "3", "--refine", "none", "--queue"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    connection = redis_server.client()
    queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    workers = []
    try:
        wait_until(lambda: queue.count == 5 or enqueuer.poll() is not None, 60, "the five chunks are queued")
        workers = [start_worker(tmp_path / f"worker-{index}.log", env) for index in range(2)]
        stdout, stderr = enqueuer.communicate(timeout=300)
        codes = [worker.wait(timeout=60) for worker in workers]
    finally:
        for process in (enqueuer, *workers):
            stop(process)
    logs = "\n".join(log_text(tmp_path / f"worker-{index}.log") for index in range(2))

    assert enqueuer.returncode == 1, stderr  # the corrupt PNG
    assert "4 images annotated, 1 failed" in stdout, stdout + stderr
    assert "broken.png" in stderr
    assert codes == [0, 0], logs
    assert logs.count("Job OK") == 5, logs  # every chunk done once, by one of the two
    for name in ("tasks.json", "coco.json"):
        assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    local_masks = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local" / "masks").rglob("*.png"))
    assert local_masks == sorted(p.relative_to(out) for p in (out / "masks").rglob("*.png"))
    for mask in local_masks:
        assert (out / mask).read_bytes() == (tmp_path / "local" / mask).read_bytes(), mask
    assert not list(out.glob(".parts-*"))
    assert len(json.loads((out / "tasks.json").read_text())) == 4

    run_id = run_of(connection, out)
    jobs = subprocess.run([sys.executable, "-m", "backend.cli", "jobs", "--run", run_id], cwd=REPO_ROOT, env=env,
                          check=False, capture_output=True, text=True, timeout=60)
    assert jobs.returncode == 0, jobs.stderr
    assert "5 images: 4 done, 0 skipped, 1 failed" in jobs.stdout and "chunks: 5 finished" in jobs.stdout, jobs.stdout
    assert "failed broken.png:" in jobs.stdout
