"""End to end: Label Studio's own "Retrieve Predictions" on a whole project, against a real Label Studio 1.23.2.

The backend (tiny models, FREESEG_PREDICT_BUDGET_SECONDS=5, no Redis: the run is the server's own, on its
inference worker at background priority) answers the action on 40 tasks at once with no results and predicts
them in the background, writing each through Label Studio's API with the connection's ``extra_params``
(``{"k": 2}``: at most two regions a prediction). Meanwhile ``GET /jobs`` shows the run and an annotator's
single-task ``/predict`` goes ahead of it. A second "Retrieve Predictions" adds nothing. After the backend
is killed mid-run, the restarted backend takes the run up by itself and nothing is written twice. With
REDIS_URL the run goes onto the queue: the backend killed right after the action loses nothing, and a
``freesegdiff worker`` predicts the tasks. The figures (the action's time, tasks/s, a single task's latency
idle and during the run) are printed.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
from labelstudio import connect_ml_backend, predictions_by_version, retrieve_predictions
from PIL import Image
from test_annotate_project import LABEL_CONFIG, project_with_photos
from test_label_studio import E2E_CAPTIONER, run_backend

from tests.queue_workers import log_text, queue_env, start_worker, stop, wait_until

TASKS = 40  # the issue's: twenty batches of two, so the run is still going when each single task is answered
KILLED_TASKS = 16  # the runs killed midway: enough batches to kill one in the middle
# batches of two: a single task waits for at most the background step the worker is running
BUDGET = {"FREESEG_PREDICT_BUDGET_SECONDS": "5", "FREESEG_MAX_BATCH": "2"}
RUN_TIMEOUT = 600.0


def noise_task(seed: int) -> dict:
    """A task of a fresh random image (no feature cache hit), as an annotator's opened task."""
    pixels = np.random.default_rng(seed).integers(0, 255, (427, 640, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return {"id": 900_000 + seed, "data": {"image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}


def single_task_seconds(backend_url: str, project: int, seed: int) -> float:
    start = time.monotonic()
    response = requests.post(f"{backend_url}/predict", json={"tasks": [noise_task(seed)], "project": str(project),
                                                             "label_config": LABEL_CONFIG}, timeout=120)
    assert response.status_code == 200 and len(response.json()["results"]) == 1, response.text
    return time.monotonic() - start


def runs(backend_url: str) -> list[dict]:
    return requests.get(f"{backend_url}/jobs", timeout=30).json()["jobs"]


def wait_for_runs_to_end(backend_url: str) -> list[dict]:
    wait_until(lambda: runs(backend_url) and all(run["state"] not in ("queued", "running") for run in runs(backend_url)),
               RUN_TIMEOUT, "the background runs to end", poll=1.0)
    return runs(backend_url)


def model_version_of(backend_url: str) -> str:
    return requests.get(f"{backend_url}/health", timeout=30).json()["model_version"]


def retrieve_timed(label_studio, project: int) -> float:
    start = time.monotonic()
    retrieve_predictions(label_studio, project)
    return time.monotonic() - start


def check_one_prediction_each(label_studio, tasks: list[int], version: str) -> None:
    per_task = {task: predictions_by_version(label_studio, task) for task in tasks}
    assert all(set(found) == {version} and len(found[version]) == 1 for found in per_task.values()), per_task
    for task in tasks:
        (prediction,) = label_studio.api("GET", "/api/predictions", params={"task": task}).json()
        assert 1 <= len(prediction["result"]) <= 2, prediction["result"]  # extra_params {"k": 2}: two clusters


@pytest.mark.e2e
def test_retrieve_predictions_answers_at_once_and_the_predictions_arrive_in_the_background(label_studio, tmp_path):
    project, tasks = project_with_photos(label_studio, TASKS)
    with run_backend(tmp_path / "server", label_studio, **BUDGET) as backend_url:
        connect_ml_backend(label_studio, project, backend_url, extra_params={"k": 2})
        version = model_version_of(backend_url)

        action = retrieve_timed(label_studio, project)
        assert action < 10, f"Retrieve Predictions took {action:.1f} s"
        (run,) = runs(backend_url)
        assert (run["project"], run["total"], run["model_version"], run["mode"]) == (project, TASKS, version, "local")
        assert run["state"] in ("queued", "running"), run
        during = []
        for seed in (1, 2):  # an annotator's task is answered while the run goes on: not stuck behind it
            during.append(single_task_seconds(backend_url, project, seed))
            (going,) = runs(backend_url)
            assert going["state"] == "running" and going["done"] < TASKS, (during, going)
        (run,) = wait_for_runs_to_end(backend_url)
        assert (run["state"], run["done"], run["skipped"], run["failed"]) == ("done", TASKS, 0, 0), run
        idle = [single_task_seconds(backend_url, project, seed) for seed in (3, 4)]
        check_one_prediction_each(label_studio, tasks, version)

        again = retrieve_timed(label_studio, project)
        assert len(runs(backend_url)) == 1  # nothing without a prediction: no new run
        check_one_prediction_each(label_studio, tasks, version)
        metrics = requests.get(f"{backend_url}/metrics", timeout=30).text
        assert "freeseg_background_runs 0.0" in metrics
    print(f"\n{TASKS} tasks, tiny profile, 2-core CPU: Retrieve Predictions answered in {action:.2f} s "
          f"(the second in {again:.2f} s); the background run {run['tasks_per_second']:.2f} tasks/s; a single task "
          f"{min(idle):.2f} s idle, {max(during):.2f} s at most during the run (each of 2 requests: idle "
          f"{', '.join(f'{s:.2f}' for s in idle)} s, during {', '.join(f'{s:.2f}' for s in during)} s)")


def kill_backend(backend_url: str) -> None:
    """SIGKILL to the backend serving on the URL's port (no shutdown: as a crash or an OOM kill)."""
    port = backend_url.rsplit(":", 1)[1]
    listing = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    (pid,) = [int(line.split()[0]) for line in listing.splitlines() if f"--port {port}" in line and "serve" in line]
    os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
def test_after_the_backend_is_killed_mid_run_the_restarted_one_takes_the_run_up(label_studio, tmp_path):
    project, tasks = project_with_photos(label_studio, KILLED_TASKS)
    server_dir: Path = tmp_path / "server"
    with run_backend(server_dir, label_studio, **BUDGET) as backend_url:
        connect_ml_backend(label_studio, project, backend_url, extra_params={"k": 2})
        version = model_version_of(backend_url)
        retrieve_timed(label_studio, project)
        wait_until(lambda: runs(backend_url)[0]["done"] >= 2, RUN_TIMEOUT, "a few tasks predicted", poll=0.2)
        kill_backend(backend_url)
    predicted = sum(bool(predictions_by_version(label_studio, task)) for task in tasks)
    assert predicted < KILLED_TASKS, "the run ended before the backend was killed"

    with run_backend(server_dir, label_studio, **BUDGET) as backend_url:  # the same MODEL_DIR: the same store
        (ml,) = label_studio.api("GET", "/api/ml", params={"project": project}).json()
        label_studio.api("DELETE", f"/api/ml/{ml['id']}")  # the restarted backend listens on another port
        connect_ml_backend(label_studio, project, backend_url, extra_params={"k": 2})
        (run,) = wait_for_runs_to_end(backend_url)  # no second Retrieve Predictions: taken up by itself
        assert (run["state"], run["total"], run["failed"]) == ("done", KILLED_TASKS, 0), run
        assert (run["done"], run["skipped"]) == (KILLED_TASKS - predicted, predicted), run
        retrieve_timed(label_studio, project)
        assert len(runs(backend_url)) == 1  # every task has its prediction: no new run
    check_one_prediction_each(label_studio, tasks, version)
    print(f"\nkilled after {predicted} of {KILLED_TASKS} tasks; the restarted backend took the run up and predicted "
          f"the other {run['done']}")


@pytest.mark.e2e
def test_with_redis_the_run_goes_onto_the_queue_and_survives_the_backend(label_studio, redis_server, tmp_path):
    project, tasks = project_with_photos(label_studio, 9)
    queue = {"REDIS_URL": redis_server.url, "FREESEG_QUEUE_NAME": f"test-background-{uuid.uuid4().hex[:8]}",
             "FREESEG_QUEUE_CHUNK_SIZE": "3"}
    server_dir: Path = tmp_path / "server"
    with run_backend(server_dir, label_studio, **BUDGET, **queue) as backend_url:
        connect_ml_backend(label_studio, project, backend_url, extra_params={"k": 2})
        version = model_version_of(backend_url)
        action = retrieve_timed(label_studio, project)
        (run,) = runs(backend_url)
        assert (run["mode"], run["state"], run["total"], run["model_version"]) == ("queued", "queued", 9, version), run
        kill_backend(backend_url)  # the chunks wait in Redis for the workers
    log = tmp_path / "worker.log"
    worker = start_worker(log, queue_env(server_dir / "models", redis_server.url, queue["FREESEG_QUEUE_NAME"],
                                         FREESEG_CAPTIONER=E2E_CAPTIONER, LABEL_STUDIO_URL=label_studio.url,
                                         LABEL_STUDIO_API_KEY=label_studio.token))
    try:
        assert worker.wait(timeout=RUN_TIMEOUT) == 0, log_text(log)
    finally:
        stop(worker)
    check_one_prediction_each(label_studio, tasks, version)
    with run_backend(server_dir, label_studio, **BUDGET, **queue) as backend_url:
        (ended,) = runs(backend_url)
        assert (ended["id"], ended["state"], ended["done"], ended["failed"]) == (run["id"], "done", 9, 0), ended
        (ml,) = label_studio.api("GET", "/api/ml", params={"project": project}).json()
        label_studio.api("DELETE", f"/api/ml/{ml['id']}")
        connect_ml_backend(label_studio, project, backend_url, extra_params={"k": 2})
        retrieve_timed(label_studio, project)
        assert len(runs(backend_url)) == 1  # nothing left without a prediction
    check_one_prediction_each(label_studio, tasks, version)
    print(f"\nwith REDIS_URL: Retrieve Predictions answered in {action:.2f} s; the run queued, the backend killed, "
          f"a worker predicted the {ended['done']} tasks")
