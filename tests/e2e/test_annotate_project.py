"""End to end: ``freesegdiff annotate-project`` against a real Label Studio 1.23.2.

In this process: a whole project predicted, then skipped, then overwritten; and a run that rides out
a Label Studio outage (a proxy answering 502 for a few seconds, one answer lost after Label Studio
stored the prediction). On a real redis-server with two real ``freesegdiff worker --burst`` processes:
a queued run in which one worker is killed (SIGKILL) in the middle of a chunk. Every task must end
with exactly one prediction of our model version, and other versions' predictions are left alone.
A queued run of a project whose annotations taught its memory predicts what the same run in
this process predicts, with the memory's revision in its model version. Last, both kinds of run predict
with the connection's ``extra_params`` exactly as the backend's ``/predict`` does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
import sklearn
from labelstudio import (
    FlakyProxy,
    LabelStudioServer,
    connect_ml_backend,
    create_prediction,
    create_project,
    get_project,
    import_image_file,
    list_predictions,
    predictions_by_version,
    retrieve_predictions,
)
from test_label_studio import E2E_CAPTIONER, run_backend
from test_learning import latest, miou, scenes_in_projects, submit_truth

from backend.cli import main
from backend.storage.job_ledger import RedisLedger
from backend.models.identity import model_version
from backend.settings import get_settings
from tests.queue_workers import REPO_ROOT, log_text, queue_env, start_worker, stop, wait_until, worker_in_mid_chunk

IMAGES = Path(sklearn.__file__).parent / "datasets" / "images"
LABELS = ("building", "tree", "sky")
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + "</BrushLabels></View>"
)
SUMMARY = re.compile(r"(\d+) tasks: (\d+) done, (\d+) skipped, (\d+) failed")
OTHER_VERSION = "someone-else-v1"


def project_with_photos(server: LabelStudioServer, count: int) -> tuple[int, list[int]]:
    project = create_project(server, LABEL_CONFIG, title=f"annotate-project-{uuid.uuid4().hex[:6]}")
    names = ("china.jpg", "flower.jpg")
    return project, [import_image_file(server, project, IMAGES / names[i % 2]) for i in range(count)]


@pytest.fixture
def cli_env(monkeypatch, label_studio: LabelStudioServer, tiny_settings):
    """The environment of an in-process ``freesegdiff`` run: tiny models, the test Label Studio, short backoff."""
    for name, value in {"FREESEG_MODELS": "tiny", "FREESEG_DEVICE": "cpu", "MODEL_DIR": str(tiny_settings.model_dir),
                        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
                        "FREESEG_LABELSTUDIO_BACKOFF_SECONDS": "0.5", "FREESEG_CAPTIONER": E2E_CAPTIONER}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def annotate(capsys, *args: str) -> tuple[int, tuple[int, int, int, int], str]:
    """Runs ``freesegdiff annotate-project`` here; its exit code, (total, done, skipped, failed) and output."""
    code = main(["annotate-project", *args])
    out = capsys.readouterr().out
    match = SUMMARY.search(out)
    assert match, out
    return code, tuple(int(n) for n in match.groups()), out


def ours_per_task(server: LabelStudioServer, tasks: list[int], version: str) -> dict[int, list[int]]:
    return {task: predictions_by_version(server, task).get(version, []) for task in tasks}


def enqueue_project(server: LabelStudioServer, project: int, redis_url: str, model_dir: Path,
                    queue_prefix: str) -> tuple[dict[str, str], str]:
    """``freesegdiff annotate-project --queue --no-wait`` in its own process, chunks of 3 tasks on a fresh
    queue; the environment its workers need and the run's id."""
    env = queue_env(model_dir, redis_url, f"{queue_prefix}-{uuid.uuid4().hex[:8]}", FREESEG_QUEUE_CHUNK_SIZE="3",
                    LABEL_STUDIO_URL=server.url, LABEL_STUDIO_API_KEY=server.token)
    enqueued = subprocess.run([sys.executable, "-m", "backend.cli", "annotate-project", "--project", str(project),
                               "--queue", "--no-wait"], cwd=REPO_ROOT, env=env, check=False, capture_output=True,
                              text=True, timeout=120)
    assert enqueued.returncode == 0, enqueued.stderr
    return env, re.search(r"run (\w+) queued", enqueued.stdout).group(1)


def run_queued(server: LabelStudioServer, project: int, redis_url: str, model_dir: Path, queue_prefix: str,
               log: Path) -> tuple[dict[str, str], str]:
    """``enqueue_project``, then one ``freesegdiff worker --burst`` (its output in ``log``) until the queue is
    empty; the workers' environment and the run's id."""
    env, run_id = enqueue_project(server, project, redis_url, model_dir, queue_prefix)
    worker = start_worker(log, env)
    try:
        assert worker.wait(timeout=240) == 0, log_text(log)
    finally:
        stop(worker)
    return env, run_id


def jobs_output(env: dict[str, str], run_id: str) -> str:
    jobs = subprocess.run([sys.executable, "-m", "backend.cli", "jobs", "--run", run_id], cwd=REPO_ROOT, env=env,
                          check=False, capture_output=True, text=True, timeout=60)
    return jobs.stdout + jobs.stderr


@pytest.mark.e2e
def test_whole_project_predicted_then_skipped_then_overwritten(label_studio, cli_env, capsys):
    project, tasks = project_with_photos(label_studio, 6)
    other = create_prediction(label_studio, tasks[0], OTHER_VERSION)
    version = model_version(get_settings())

    code, counts, out = annotate(capsys, "--project", str(project))
    assert (code, counts) == (0, (6, 6, 0, 0)), out
    first = ours_per_task(label_studio, tasks, version)
    assert all(len(ids) == 1 for ids in first.values()), first
    regions = [r for task in tasks for p in list_predictions(label_studio, task) if p["model_version"] == version
               for r in p["result"]]
    assert regions and all(r["type"] == "brushlabels" and r["from_name"] == "tag" and r["to_name"] == "image"
                           and set(r["value"]["brushlabels"]) <= set(LABELS) for r in regions)

    code, counts, out = annotate(capsys, "--project", str(project))
    assert (code, counts) == (0, (6, 0, 6, 0)), out
    assert ours_per_task(label_studio, tasks, version) == first

    code, counts, out = annotate(capsys, "--project", str(project), "--overwrite")
    assert (code, counts) == (0, (6, 6, 0, 0)), out
    replaced = ours_per_task(label_studio, tasks, version)
    assert all(len(ids) == 1 for ids in replaced.values()), replaced
    assert not {i for ids in first.values() for i in ids} & {i for ids in replaced.values() for i in ids}
    assert predictions_by_version(label_studio, tasks[0])[OTHER_VERSION] == [other]


@pytest.mark.e2e
def test_a_label_studio_outage_is_ridden_out(label_studio, cli_env, capsys, caplog, monkeypatch):
    project, tasks = project_with_photos(label_studio, 5)
    proxy = FlakyProxy(label_studio.url)
    # after the second stored prediction, the third is stored but its answer lost, then 3 s of 502s
    proxy.outage_after("POST", "/api/predictions", count=2, seconds=3.0)
    monkeypatch.setenv("LABEL_STUDIO_URL", proxy.url)
    get_settings.cache_clear()
    version = model_version(get_settings())
    try:
        code, (total, done, skipped, failed), out = annotate(capsys, "--project", str(project))
    finally:
        proxy.stop()

    assert code == 0 and (total, failed) == (5, 0) and done + skipped == 5 and done >= 4, out
    assert sum(status == 502 for _, _, status in proxy.statuses) >= 2, proxy.statuses
    assert all(len(ids) == 1 for ids in ours_per_task(label_studio, tasks, version).values())
    retries = [r.getMessage() for r in caplog.records if "failed (HTTP 502); try 2 of 6" in r.getMessage()]
    assert retries, [r.getMessage() for r in caplog.records]


@pytest.mark.e2e
def test_queued_run_survives_a_worker_killed_mid_chunk(label_studio, redis_server, tiny_settings, tiny_segmenter,
                                                       tmp_path):
    project, tasks = project_with_photos(label_studio, 9)
    env, run_id = enqueue_project(label_studio, project, redis_server.url, tiny_settings.model_dir, "test-project")
    connection, queue_name = redis.Redis.from_url(redis_server.url), env["FREESEG_QUEUE_NAME"]
    logs = [tmp_path / f"worker-{index}.log" for index in range(2)]
    workers = [start_worker(log, env) for log in logs]
    try:
        victim: list[int] = []
        wait_until(lambda: victim.append(worker_in_mid_chunk(connection, queue_name, run_id)) or victim[-1] is not None,
                   240, "a worker in the middle of a chunk")
        os.kill(victim[-1], signal.SIGKILL)
        (survivor,) = [worker for worker in workers if worker.pid != victim[-1]]
        assert survivor.wait(timeout=240) == 0, log_text(logs[workers.index(survivor)])
    finally:
        for worker in workers:
            stop(worker)

    survivor_log = log_text(logs[workers.index(survivor)])
    assert "its worker sent no heartbeat for 3 s (killed or cut off): requeued" in survivor_log, survivor_log
    progress = RedisLedger(connection, run_id).progress()
    assert progress.complete and progress.failed == 0 and progress.done >= 1, progress
    version = RedisLedger(connection, run_id).fields()["model_version"]
    per_task = ours_per_task(label_studio, tasks, version)
    assert all(len(ids) == 1 for ids in per_task.values()), per_task
    jobs = jobs_output(env, run_id)
    assert "chunks: 3 finished" in jobs and "9 tasks:" in jobs, jobs


@pytest.mark.e2e
def test_a_queued_run_predicts_with_the_projects_memory(label_studio, redis_server, cli_env, capsys, monkeypatch,
                                                        tiny_settings, tmp_path):
    truths, (project,), (tasks,) = scenes_in_projects(label_studio, tmp_path / "scenes", 8, 0,
                                                      (f"queued-memory-{uuid.uuid4().hex[:6]}",))
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    get_settings.cache_clear()
    version = model_version(get_settings())
    later = slice(4, None)

    assert annotate(capsys, "--project", str(project))[:2] == (0, (8, 8, 0, 0))
    without = miou(label_studio, tasks[later], truths[later])
    for task, truth in zip(tasks[:4], truths[:4]):
        submit_truth(label_studio, task, truth)
    assert main(["learn", "--project", str(project)]) == 0
    revision = re.search(r"memory of 4 annotations, .*revision (\d+)", capsys.readouterr().out).group(1)
    taught = f"{version}-m{revision}"

    log = tmp_path / "worker.log"
    env, run_id = run_queued(label_studio, project, redis_server.url, tiny_settings.model_dir, "test-memory", log)
    queued = [latest(label_studio, task) for task in tasks]
    assert [prediction["model_version"] for prediction in queued] == [taught] * 8, log_text(log)
    jobs = jobs_output(env, run_id)
    assert f"model version {taught}" in jobs, jobs
    assert not redis.Redis.from_url(redis_server.url).exists(f"freeseg:run:{run_id}:memory")  # released at the end
    with_memory = miou(label_studio, tasks[later], truths[later])

    code, counts, out = annotate(capsys, "--project", str(project), "--overwrite")
    assert (code, counts) == (0, (8, 8, 0, 0)) and f"model version {taught} (" in out, out
    in_process = [latest(label_studio, task) for task in tasks]
    assert [p["result"] for p in in_process] == [p["result"] for p in queued]
    assert all(set(predictions_by_version(label_studio, task)) == {version, taught} for task in tasks)
    print(f"\nmIoU (%) of the 4 later tasks: {without:.2f} without the memory, {with_memory:.2f} with it ({taught})")
    assert with_memory >= without + 10


@pytest.mark.e2e
def test_both_runs_predict_with_the_connections_extra_params_as_predict_does(label_studio, redis_server, cli_env,
                                                                           capsys, monkeypatch, tiny_settings,
                                                                           tmp_path):
    """``{"k": 2}`` on each project's connection. The run in this process shares the server's MODEL_DIR (what
    /setup kept); the queued run's processes share nothing with the server: they read Label Studio's record."""
    (by_predict, predicted), (in_process, local_tasks), (queued, queued_tasks) = (
        project_with_photos(label_studio, 2) for _ in range(3))
    with run_backend(tmp_path / "server", label_studio) as backend_url:
        for project in (by_predict, in_process, queued):
            connect_ml_backend(label_studio, project, backend_url, extra_params={"k": 2})
        retrieve_predictions(label_studio, by_predict)
    expected = [latest(label_studio, task) for task in predicted]

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "server" / "models"))
    get_settings.cache_clear()
    assert annotate(capsys, "--project", str(in_process))[:2] == (0, (2, 2, 0, 0))
    log = tmp_path / "worker.log"
    run_queued(label_studio, queued, redis_server.url, tiny_settings.model_dir, "test-extra-params", log)
    for tasks in (local_tasks, queued_tasks):
        made = [latest(label_studio, task) for task in tasks]
        assert [p["model_version"] for p in made] == [p["model_version"] for p in expected]
        assert [p["result"] for p in made] == [p["result"] for p in expected], log_text(log)


@pytest.mark.e2e
def test_runs_read_their_tasks_without_making_the_connected_backend_predict_them(label_studio, redis_server, cli_env,
                                                                               capsys, tiny_settings, tmp_path):
    """With the backend connected and ``show_collab_predictions`` on (Label Studio's default), reading a task by
    ``GET /api/tasks/{id}`` has Label Studio call the backend's /predict for it first: the runs then found every
    task predicted and reported "0 done, N skipped". Both runs must do the work themselves."""
    (local, local_tasks), (queued, queued_tasks) = (project_with_photos(label_studio, 3) for _ in range(2))
    with run_backend(tmp_path / "server", label_studio) as backend_url:
        for project in (local, queued):
            connect_ml_backend(label_studio, project, backend_url)
            assert get_project(label_studio, project)["show_collab_predictions"]
        assert annotate(capsys, "--project", str(local))[:2] == (0, (3, 3, 0, 0))
        env, run_id = run_queued(label_studio, queued, redis_server.url, tiny_settings.model_dir, "test-no-trigger",
                                 tmp_path / "worker.log")
        progress = RedisLedger(redis.Redis.from_url(redis_server.url), run_id).progress()
        assert (progress.done, progress.skipped, progress.failed) == (3, 0, 0), jobs_output(env, run_id)
    version = model_version(get_settings())
    for tasks in (local_tasks, queued_tasks):
        assert all(len(ids) == 1 for ids in ours_per_task(label_studio, tasks, version).values())
