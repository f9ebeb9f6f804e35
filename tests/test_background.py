"""Background runs of /predict (issue 33): the budget decision, runs that add no duplicate work, cancelling,
and a run on the server's own inference worker with the tiny models, writing through a stand-in project."""

from __future__ import annotations

import dataclasses
import logging
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backend.jobs.background_runs import LocalRun, active, current
from backend.jobs.project import ProjectRun
from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.config import parse_label_config
from backend.labelstudio.project_context import project_context
from backend.labelstudio.projects import ProjectSetup
from backend.models.identity import model_version
from backend.server.app import create_app
from backend.server.background import WorkerSegmenter
from backend.server.inference import InferenceWorker
from backend.server.predict_budget import PRIOR_SECONDS_PER_IMAGE, PredictBudget
from backend.storage.run_registry import RunRecord, RunRegistry, this_process
from backend.storage.shared_store import FileStore
from tests.app_client import wait_until_ready
from tests.fake_labelstudio import data_uri

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="building"/><Label value="tree"/></BrushLabels></View>')


def test_the_budget_sends_only_many_tasks_over_it_to_the_background():
    budget = PredictBudget(60, "cpu")
    assert budget.seconds_per_image == PRIOR_SECONDS_PER_IMAGE["cpu"] == 30
    assert not budget.too_big(2, interactive=False)  # 60 s: within
    assert budget.too_big(3, interactive=False)
    assert not budget.too_big(1000, interactive=True)  # a click or a typed prompt: an annotator waits
    assert not PredictBudget(0.001, "cpu").too_big(1, interactive=False)  # one task: always answered now
    assert PredictBudget(60, "cuda").seconds_per_image == 2
    assert PredictBudget(60, "cpu", tiny_models=True).seconds_per_image == 2  # not full-size models' 30 s
    budget.observe(10, 1.0)  # the first measurement replaces the prior
    assert budget.seconds_per_image == pytest.approx(0.1) and not budget.too_big(500, interactive=False)
    budget.observe(1, 1.1)  # later ones are weighed in
    assert budget.seconds_per_image == pytest.approx(0.7 * 0.1 + 0.3 * 1.1)
    assert budget.too_big(200, interactive=False)


def test_a_second_request_for_tasks_of_an_active_run_adds_no_work(tmp_path):
    registry = RunRegistry(FileStore(tmp_path))
    going = lambda record: True  # noqa: E731
    first = registry.claim(7, "v1", [1, 2, 3], "local", going)
    assert first.task_ids == [1, 2, 3] and first.state == "queued"
    assert registry.claim(7, "v1", [3, 2, 1], "local", going) is None
    second = registry.claim(7, "v1", [2, 3, 4, 5], "local", going)
    assert second.task_ids == [4, 5]
    assert registry.claim(7, "v2", [1], "local", going).task_ids == [1]  # another model_version: its own run
    assert registry.claim(8, "v1", [1], "local", going).task_ids == [1]  # another project
    assert registry.claim(7, "v1", [1, 2], "local", lambda record: False).task_ids == [1, 2]  # the runs ended
    assert {record.id for record in registry.runs()} >= {first.id, second.id}
    assert registry.get("not a run id") is None


def test_a_run_whose_process_died_or_went_silent_waits_to_be_taken_up(tmp_path):
    now = time.time()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = RunRecord("r1", 7, "v1", "local", [1], owner=f"{socket.gethostname()}:{dead.pid}",
                       created=now, heartbeat=now, state="running")
    assert record.lost(now)
    alive = RunRecord("r2", 7, "v1", "local", [1], owner=f"elsewhere:{dead.pid}", created=now, heartbeat=now,
                      state="running")
    assert not alive.lost(now) and alive.lost(now + 31)
    shown = current(record, None)
    assert shown.state == "queued" and "takes it up" in shown.reason
    registry = RunRegistry(FileStore(tmp_path))
    registry.put(record)
    assert registry.claim(7, "v1", [1], "local", lambda found: active(found, None)) is None  # still held
    assert current(dataclasses.replace(record, cancel=True), None).state == "cancelled"
    registry.update(record.id, lambda found: dataclasses.replace(found, state="failed"))  # nobody could take it up
    assert registry.claim(7, "v1", [1], "local", lambda found: active(found, None)).task_ids == [1]


class StandInProject:
    """The part of ``LabelStudioProject`` a run uses: its tasks, and the predictions written to them."""

    access = LabelStudioAccess("http://label-studio.invalid", "key")
    project = 7

    def __init__(self, images: dict[int, np.ndarray]) -> None:
        self.data = {task: {"image": data_uri(image)} for task, image in images.items()}
        self.predictions: dict[int, list[dict]] = {task: [] for task in images}

    def task(self, task_id: int) -> dict:
        return {"id": task_id, "project": 7, "data": self.data[task_id],
                "model_versions": [p["model_version"] for p in self.predictions[task_id]]}

    def prediction_ids(self, task_id: int, version: str) -> list[int]:
        return [i for i, p in enumerate(self.predictions[task_id]) if p["model_version"] == version]

    def create_prediction(self, task_id: int, prediction: dict) -> None:
        self.predictions[task_id].append(prediction)


@pytest.fixture
def worker(tiny_segmenter):
    worker = InferenceWorker(lambda: tiny_segmenter, capacity=8)
    worker.start()
    worker.wait_until_loaded()
    yield worker
    worker.stop()


def local_run(tiny_settings, worker, registry, project, task_ids) -> LocalRun:
    settings = tiny_settings.model_copy(update={"max_batch": 2})
    version = model_version(settings)
    context = project_context(settings, parse_label_config(CONFIG), ProjectSetup(options={"k": 2}), None)
    record = registry.claim(7, version, task_ids, "local", lambda found: active(found, None))
    observed = []
    segmenter = WorkerSegmenter(worker, lambda images, seconds: observed.append(images))
    run = LocalRun(record, ProjectRun(project, context, overwrite=False), segmenter, segmenter.encoder, settings,
                   registry)
    run.observed = observed
    return run


def test_a_local_run_writes_each_task_once_on_the_servers_worker_and_a_second_run_adds_nothing(
        tiny_settings, worker, tmp_path):
    rng = np.random.default_rng(0)
    project = StandInProject({task: rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for task in range(1, 6)})
    registry = RunRegistry(FileStore(tmp_path))
    run = local_run(tiny_settings, worker, registry, project, [1, 2, 3, 4, 5])
    run.run()
    record = registry.get(run.record.id)
    assert (record.state, record.done, record.skipped, record.failed) == ("done", 5, 0, 0)
    assert run.observed == [2, 2, 1]  # batches of FREESEG_MAX_BATCH on the worker, timed for the budget
    assert all(len(found) == 1 for found in project.predictions.values())
    assert all(len({r["id"] for r in p["result"]}) <= 2 for found in project.predictions.values() for p in found)

    again = local_run(tiny_settings, worker, registry, project, [1, 2, 3, 4, 5])  # after a restart, say
    again.run()
    assert (registry.get(again.record.id).done, registry.get(again.record.id).skipped) == (0, 5)
    assert all(len(found) == 1 for found in project.predictions.values())


def test_a_cancelled_run_stops_after_its_current_batch(tiny_settings, worker, tmp_path):
    project = StandInProject({task: np.full((32, 32, 3), task * 40, dtype=np.uint8) for task in range(1, 7)})
    registry = RunRegistry(FileStore(tmp_path))
    run = local_run(tiny_settings, worker, registry, project, list(range(1, 7)))
    registry.request_cancel(run.record.id)  # as DELETE /jobs/{id} or freesegdiff jobs --cancel from elsewhere
    run.run()
    record = registry.get(run.record.id)
    assert record.state == "cancelled" and record.done == 2, record
    assert sum(len(found) for found in project.predictions.values()) == 2


def test_without_label_studio_access_a_request_over_the_budget_is_answered_now(tiny_settings, tiny_segmenter,
                                                                              image_server, caplog):
    settings = tiny_settings.model_copy(update={"predict_budget_seconds": 0.001, "label_studio_url": None})
    tasks = [{"id": i, "data": {"image": f"{image_server}/china.jpg"}} for i in (1, 2)]
    with TestClient(create_app(settings, load_segmenter=lambda: tiny_segmenter)) as client:
        wait_until_ready(client)
        with caplog.at_level(logging.WARNING):
            body = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "41.1"}).json()
        assert len(body["results"]) == 2 and all(p["result"] for p in body["results"])
        assert "no Label Studio access" in caplog.text and "LABEL_STUDIO_URL" in caplog.text
        assert client.get("/jobs").json() == {"jobs": []}
        assert client.delete("/jobs/r123").status_code == 404
        assert "freeseg_background_runs 0.0" in client.get("/metrics").text


def test_freesegdiff_jobs_lists_the_background_runs_and_cancels_one(tiny_environment, tmp_path, capsys):
    from backend.cli import main

    tiny_environment.setenv("MODEL_DIR", str(tmp_path))
    tiny_environment.delenv("REDIS_URL", raising=False)
    registry = RunRegistry(FileStore(tmp_path))
    record = registry.claim(7, "v1", [1, 2, 3], "local", lambda found: True)  # this process owns it, alive
    assert main(["jobs"]) == 0
    out = capsys.readouterr().out
    assert f"background run {record.id} (project 7, v1, local): queued, 3 tasks: 0 done" in out, out
    assert main(["jobs", "--cancel", record.id]) == 0
    assert registry.get(record.id).cancel  # its owner stops after the current batch
    assert main(["jobs", "--cancel", "r-none"]) == 1


def test_a_background_step_waits_while_a_request_is_answered(tiny_settings, worker, tmp_path):
    project = StandInProject({task: np.full((32, 32, 3), task * 40, dtype=np.uint8) for task in range(1, 4)})
    run = local_run(tiny_settings, worker, RunRegistry(FileStore(tmp_path)), project, [1, 2, 3])
    with worker.requests.serving():  # an annotator's /predict in flight
        thread = threading.Thread(target=run.run)
        thread.start()
        thread.join(timeout=1.5)
        assert thread.is_alive() and run.observed == [] and not any(project.predictions.values())
    thread.join(timeout=60)
    assert not thread.is_alive() and run.observed == [2, 1]
    assert all(len(found) == 1 for found in project.predictions.values())


def lost_record(project: int, version: str) -> RunRecord:
    """A local run whose server was killed: its process on this host is gone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    return RunRecord("r" + str(dead.pid), project, version, "local", [1, 2], owner=f"{socket.gethostname()}:{dead.pid}",
                     created=now, heartbeat=now, state="running", done=1)


def test_a_lost_run_is_adopted_by_one_process_only(tmp_path):
    registry = RunRegistry(FileStore(tmp_path))
    lost = lost_record(7, "v1")
    registry.put(lost)
    adopted = registry.adopt(lost.id)
    assert adopted.owner == this_process() and adopted.state == "running" and not adopted.lost(time.time())
    assert registry.adopt(lost.id) is None  # taken: its heartbeat is fresh, its owner alive
    cancelled = dataclasses.replace(lost_record(7, "v1"), cancel=True)
    registry.put(cancelled)
    assert registry.adopt(cancelled.id) is None and registry.adopt("r-none") is None


def test_a_lost_run_a_server_cannot_take_up_is_marked_failed_with_why(tiny_settings, tiny_segmenter, tmp_path):
    settings = tiny_settings.model_copy(update={"model_dir": tmp_path, "label_studio_url": None})
    with TestClient(create_app(settings, load_segmenter=lambda: tiny_segmenter)) as client:
        wait_until_ready(client)
        background = client.app.state.backend.background
        no_setup = lost_record(7, model_version(settings))
        background.registry.put(no_setup)
        client.post("/setup", json={"project": "8.1", "schema": CONFIG, "hostname": "http://label-studio.invalid",
                                    "access_token": "key"})
        other_models = lost_record(8, "another-version")
        background.registry.put(other_models)
        assert background.take_up_lost_runs() == []
        runs = {run["id"]: run for run in client.get("/jobs").json()["jobs"]}
    assert runs[no_setup.id]["state"] == "failed" and "/setup kept no label config" in runs[no_setup.id]["reason"]
    assert runs[other_models.id]["state"] == "failed"
    assert "this server predicts as" in runs[other_models.id]["reason"], runs[other_models.id]


def test_cancelling_a_queued_run_cancels_its_waiting_chunks_on_redis(tiny_settings, redis_server):
    import redis
    from rq.job import Job, JobStatus
    from rq.serializers import JSONSerializer

    from backend.jobs.background_runs import cancel
    from backend.jobs.queue import enqueue_chunks, job_queue
    from backend.storage.job_ledger import RedisLedger
    from backend.storage.shared_store import RedisStore

    connection = redis.Redis.from_url(redis_server.url)
    settings = tiny_settings.model_copy(update={"queue_name": f"test-cancel-{time.time_ns()}", "queue_chunk_size": 2})
    ledger = RedisLedger.create(connection, "project", "7 on http://label-studio.invalid", 5)
    chunks = enqueue_chunks(job_queue(connection, settings), ledger, "backend.jobs.project.annotate_project_chunk",
                            [1, 2, 3, 4, 5], {"project": 7, "overwrite": False}, settings)  # no worker: they wait
    registry = RunRegistry(RedisStore(redis_server.url))
    record = registry.claim(7, "v1", [1, 2, 3, 4, 5], "queued", lambda found: active(found, connection))
    registry.update(record.id, lambda found: dataclasses.replace(found, queue_run=ledger.run_id))
    assert current(registry.get(record.id), connection).state == "queued"

    cancelled = cancel(registry, record.id, connection)
    assert cancelled.state == "cancelled" and not active(cancelled, connection)
    jobs = Job.fetch_many(chunks, connection=connection, serializer=JSONSerializer)
    assert len(jobs) == 3 and all(job.get_status() == JobStatus.CANCELED for job in jobs)
    again = registry.claim(7, "v1", [1, 2, 3, 4, 5], "queued", lambda found: active(found, connection))
    assert again is not None and again.task_ids == [1, 2, 3, 4, 5]  # a cancelled run holds its tasks no more
