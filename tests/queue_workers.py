"""Real ``freesegdiff worker`` processes for the tests of queued runs, and ways to watch and kill them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.storage.job_ledger import RedisLedger

REPO_ROOT = Path(__file__).resolve().parents[1]


def queue_env(model_dir: Path, redis_url: str, queue_name: str, **extra: str) -> dict[str, str]:
    """The environment of a worker (or an enqueuing command): tiny models, this Redis and queue, short leases."""
    env = dict(os.environ)
    env.update({
        "FREESEG_MODELS": "tiny",
        "FREESEG_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "MODEL_DIR": str(model_dir),
        "REDIS_URL": redis_url,
        "FREESEG_QUEUE_NAME": queue_name,
        "FREESEG_QUEUE_LEASE_SECONDS": "3",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",  # several workers on this machine's cores (docs/jobs.md, "Workers on many machines")
        **extra,
    })
    return env


def start_worker(log_path: Path, env: Mapping[str, str]) -> subprocess.Popen:
    """``freesegdiff worker --burst`` in its own process group, its output in ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--burst"], cwd=REPO_ROOT,
                                env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(poll)


def worker_in_mid_chunk(connection: redis.Redis, queue_name: str, run_id: str) -> int | None:
    """The pid of a worker whose current chunk has some but not all of its items settled, if there is one."""
    ledger = RedisLedger(connection, run_id)
    for worker in Worker.all(connection=connection, queue=Queue(queue_name, connection=connection,
                                                                serializer=JSONSerializer)):
        job_id = worker.get_current_job_id()
        if not job_id:
            continue
        items = Job.fetch(job_id, connection=connection, serializer=JSONSerializer).args[1]
        settled = sum(ledger.settled(str(item)) for item in items)
        if 0 < settled < len(items):
            return worker.pid
    return None


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
