"""The ML backend protocol over HTTP, with the tiny profile's real models."""

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import decode_rle

from backend.server.app import create_app
from backend.settings import Settings
from tests.app_client import image_tasks, predict, wait_until_ready
from tests.http_server import send

BRUSH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="building"/><Label value="tree"/><Label value="Sky" predicted_values="heaven"/>
  </BrushLabels>
</View>"""
POLYGON_CONFIG = BRUSH_CONFIG.replace("BrushLabels", "PolygonLabels")
LABELS = {"building", "tree", "Sky"}
PROJECT = "1.1"


def _client(settings: Settings, load) -> TestClient:
    return TestClient(create_app(settings, load_segmenter=load))


@pytest.fixture(scope="module")
def client(tiny_settings, tiny_segmenter):
    with _client(tiny_settings, lambda: tiny_segmenter) as client:
        wait_until_ready(client)
        yield client


def _mask(region: dict) -> np.ndarray:
    height, width = region["original_height"], region["original_width"]
    return np.reshape(decode_rle(region["value"]["rle"]), (height, width, 4))[:, :, 3] > 0


def test_predict_returns_one_brush_prediction_per_task_in_order(client, image_server):
    tasks = image_tasks(f"{image_server}/china.jpg", f"{image_server}/flower.jpg")
    response = predict(client, tasks, BRUSH_CONFIG, project=PROJECT)
    assert response.status_code == 200
    body = response.json()
    assert len(body["results"]) == 2
    for prediction in body["results"]:
        assert prediction["model_version"].endswith("tiny-random-weights")
        assert prediction["result"], "each photo gets at least one region"
        for region in prediction["result"]:
            assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image", "brushlabels")
            assert region["value"]["format"] == "rle" and region["value"]["brushlabels"][0] in LABELS
            assert _mask(region).shape == (427, 640) and _mask(region).any()
            assert 0 <= region["score"] <= 1


def test_a_failing_image_gets_an_empty_result_and_the_others_go_on(client, image_server):
    tasks = [{"id": 1, "data": {"image": f"{image_server}/missing.jpg"}},
             {"id": 2, "data": {"image": f"{image_server}/corrupt.jpg"}},
             {"id": 3, "data": {"image": f"{image_server}/china.jpg"}},
             {"id": 4, "data": {"other": "no image key"}}]
    body = predict(client, tasks, BRUSH_CONFIG, project=PROJECT).json()
    assert [bool(p["result"]) for p in body["results"]] == [False, False, True, False]
    metrics = client.get("/metrics").text
    assert 'freeseg_errors_total{kind="image_http_404"}' in metrics
    assert 'freeseg_errors_total{kind="image_decode"}' in metrics
    assert client.get("/health").json()["status"] == "UP"


def test_polygon_config_gets_polygons(client, image_server):
    body = predict(client, image_tasks(f"{image_server}/china.jpg"), POLYGON_CONFIG, project=PROJECT).json()
    regions = body["results"][0]["result"]
    assert regions and all(r["type"] == "polygonlabels" for r in regions)
    for region in regions:
        points = np.array(region["value"]["points"])
        assert len(points) >= 3 and (points >= 0).all() and (points <= 100).all()
        assert region["value"]["polygonlabels"][0] in LABELS


def test_setup_answers_with_the_model_version_and_keeps_extra_params(client, image_server):
    start = time.perf_counter()
    response = client.post("/setup", json={"project": "3.3", "schema": BRUSH_CONFIG, "extra_params": {"k": 2}})
    assert time.perf_counter() - start < 3
    assert response.status_code == 200 and response.json()["model_version"].startswith("freesegdiff-")
    body = predict(client, image_tasks(f"{image_server}/china.jpg"), project="3.3").json()  # config from /setup
    assert 1 <= len(body["results"][0]["result"]) <= 2  # K = 2 clusters at most
    assert client.post("/setup", json={"project": "3.3", "extra_params": {"k": 99}}).status_code == 400


def test_versions_webhook_and_metrics(client, image_server):
    assert predict(client, image_tasks(f"{image_server}/china.jpg"), BRUSH_CONFIG, project=PROJECT).status_code == 200
    assert client.get("/versions").json()["versions"][0].startswith("freesegdiff-")
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}}).status_code == 200
    metrics = client.get("/metrics").text
    for stage in ("caption", "features", "candidates", "clustering", "labelling", "refine", "results"):
        assert f'freeseg_stage_seconds_count{{stage="{stage}"}}' in metrics
    assert 'freeseg_model_state{state="ready"} 1.0' in metrics
    assert "freeseg_queue_depth" in metrics and 'freeseg_requests_total{endpoint="predict"}' in metrics


def test_health_answers_at_once_while_models_load(tiny_settings, tiny_segmenter):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return tiny_segmenter

    with _client(tiny_settings.model_copy(update={"load_wait_seconds": 0.2}), slow_load) as client:
        start = time.perf_counter()
        health = client.get("/health")
        assert time.perf_counter() - start < 1
        assert health.json()["model_state"] == "loading"
        assert client.post("/setup", json={"project": "1.1", "schema": BRUSH_CONFIG}).status_code == 200
        # answered after the 0.2 s wait
        busy = predict(client, image_tasks("http://127.0.0.1:9/x.jpg"), BRUSH_CONFIG, project=PROJECT)
        assert busy.status_code == 503 and busy.headers["Retry-After"]
        release.set()
        wait_until_ready(client)


def test_a_prediction_sent_while_models_load_waits_for_them(tiny_settings, tiny_segmenter, image_server):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return tiny_segmenter

    with _client(tiny_settings.model_copy(update={"load_wait_seconds": 60}), slow_load) as client:
        answer: list = []
        request = threading.Thread(target=lambda: answer.append(
            predict(client, image_tasks(f"{image_server}/china.jpg"), BRUSH_CONFIG, project=PROJECT)))
        request.start()
        request.join(0.5)
        assert request.is_alive() and client.get("/health").json()["model_state"] == "loading"
        release.set()
        request.join(60)
        assert answer[0].status_code == 200 and answer[0].json()["results"][0]["result"]


def test_a_failed_load_answers_a_waiting_prediction_at_once_with_the_error(tiny_settings):
    release = threading.Event()

    def broken_load():
        release.wait(30)
        raise RuntimeError("weights missing: set FREESEG_SD_MODEL")

    with _client(tiny_settings.model_copy(update={"load_wait_seconds": 60}), broken_load) as client:
        answer: list = []
        request = threading.Thread(target=lambda: answer.append(
            predict(client, image_tasks("http://127.0.0.1:9/x.jpg"), BRUSH_CONFIG, project=PROJECT)))
        request.start()
        request.join(0.3)
        assert request.is_alive()
        start = time.monotonic()
        release.set()
        request.join(30)
        assert time.monotonic() - start < 10  # not the 60 s of the wait
        assert answer[0].status_code == 503 and "FREESEG_SD_MODEL" in answer[0].json()["error"]
        later = time.monotonic()
        unreachable = image_tasks("http://127.0.0.1:9/x.jpg")
        assert predict(client, unreachable, BRUSH_CONFIG, project=PROJECT).status_code == 503
        assert time.monotonic() - later < 5


def test_failed_model_load_shows_on_health(tiny_settings):
    def broken_load():
        raise RuntimeError("weights missing: set FREESEG_SD_MODEL")

    with _client(tiny_settings, broken_load) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").json()["model_state"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        health = client.get("/health")
        assert health.status_code == 503 and "FREESEG_SD_MODEL" in health.json()["error"]


def test_full_queue_answers_503_with_retry_after(tiny_segmenter, tmp_path, image_server):
    settings = Settings(models="tiny", device="cpu", model_dir=tmp_path, queue_size=1, allow_private_urls=True)
    with _client(settings, lambda: tiny_segmenter) as client:
        wait_until_ready(client)
        worker = client.app.state.worker
        gate, started = threading.Event(), threading.Event()
        running = worker.submit(lambda segmenter: (started.set(), gate.wait(30)))  # occupies the worker
        assert started.wait(10)
        queued = worker.submit(lambda segmenter: None)  # fills the queue of one
        response = predict(client, image_tasks(f"{image_server}/china.jpg"), BRUSH_CONFIG, project=PROJECT)
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        gate.set()
        running.result(10), queued.result(10)
        china = image_tasks(f"{image_server}/china.jpg")
        assert predict(client, china, BRUSH_CONFIG, project=PROJECT).status_code == 200


def test_health_answers_within_a_second_while_a_prediction_runs(client, image_server):
    tasks = [{"id": i, "data": {"image": f"{image_server}/china.jpg?{i}"}} for i in range(3)]
    worker = threading.Thread(target=lambda: predict(client, tasks, BRUSH_CONFIG.replace(
        'toName="image">', 'toName="image" model_k="6">'), project=PROJECT))
    worker.start()
    timings = []
    while worker.is_alive():
        start = time.perf_counter()
        assert client.get("/health").status_code == 200
        timings.append(time.perf_counter() - start)
        time.sleep(0.05)
    worker.join()
    assert timings and max(timings) < 1.0, f"slowest /health {max(timings):.2f} s"


def test_annotation_webhook_records_feedback_against_our_prediction(tiny_settings, tiny_segmenter, tmp_path,
                                                                    http_server):
    import json as json_module

    from label_studio_sdk.converter.brush import mask2rle

    from backend.storage.feedback_log import FileFeedbackStore

    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[5:15, 5:15] = 255
    corrected = mask.copy()
    corrected[5:15, 5:10] = 0  # the annotator kept half of the region

    def region(m, label="Sky"):
        return {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 40,
                "original_height": 30, "value": {"format": "rle", "rle": mask2rle(m), "brushlabels": [label]}}

    ours = {"id": 11, "task": 5, "model_version": "freesegdiff-0.1.0-x", "result": [region(mask)]}

    def label_studio(handler):
        body = json_module.dumps([ours] if handler.path.startswith("/api/predictions/?task=5") else []).encode()
        code = 200 if handler.headers.get("Authorization") == "Token feedback-token" else 401
        send(handler, code, body, {"content-type": "application/json"})

    http_server.fallback = label_studio
    settings = tiny_settings.model_copy(update={"model_dir": tmp_path, "label_studio_api_key": "feedback-token",
                                                "label_studio_url": http_server.url})
    payload = {"action": "ANNOTATION_CREATED", "project": {"id": 3},
               "annotation": {"id": 1, "task": 5, "result": [region(corrected)]}}
    with _client(settings, lambda: tiny_segmenter) as client:
        assert client.post("/webhook", json=payload).status_code == 200
        metrics = client.get("/metrics").text
    (record,) = FileFeedbackStore(tmp_path / "feedback").records("3")
    assert record.task == 5 and [(f.label, f.outcome, f.iou) for f in record.labels] == [("Sky", "edited", 0.5)]
    assert 'freeseg_feedback_regions_total{label="Sky",outcome="edited"} 1.0' in metrics


@pytest.mark.slow
def test_the_encoder_setting_reaches_predict_the_cache_key_and_model_version(tiny_settings, tiny_segmenter,
                                                                             image_server):
    from backend.models.identity import model_version
    from backend.models.process import process_segmenter
    from backend.storage.feature_cache import cache_key

    taesd_settings = tiny_settings.model_copy(update={"encoder": "taesd"})
    tasks = [{"id": 1, "data": {"image": f"{image_server}/china.jpg"}}]
    with _client(taesd_settings, None) as client:  # the app loads its own models, as a server does
        wait_until_ready(client)
        [prediction] = predict(client, tasks, BRUSH_CONFIG, project=PROJECT).json()["results"]
    taesd = process_segmenter(taesd_settings)
    assert type(taesd.features.network.encoder).__name__ == "EncoderTiny"  # TAESD's, not the VAE's
    assert prediction["result"] and prediction["model_version"].endswith("-taesd-tiny-random-weights")
    assert prediction["model_version"] != model_version(tiny_settings)
    assert cache_key(b"one photo", taesd.fingerprint) != cache_key(b"one photo", tiny_segmenter.fingerprint)
