"""Re-prompting from the feature cache over HTTP, against a real redis-server."""

import logging
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import redis
import requests
from fastapi.testclient import TestClient

from backend.pipeline.clustering import cluster_feature_grid
from backend.pipeline.labelling import cluster_masks
from tests.redis_server import free_port
from tests.app_client import image_tasks, predict, predictions, ready_client

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image" model_refine="none">
    <Label value="Couch" predicted_values="sofa, settee"/><Label value="Cat"/><Label value="Person"/>
    <Label value="Sky"/><Label value="Tree"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Sky"/><Label value="Tree"/></KeyPointLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""
PROJECT = "9.9"


def stage_count(client: TestClient, stage: str) -> float:
    match = re.search(rf'freeseg_stage_seconds_count{{stage="{stage}"}} ([0-9.]+)', client.get("/metrics").text)
    return float(match.group(1)) if match else 0.0


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def cached_client(redis_server, tiny_settings, tiny_segmenter):
    with redis.Redis(port=redis_server.port) as raw:
        raw.flushdb()
    settings = tiny_settings.model_copy(update={"redis_url": redis_server.url, "cache_retry_after_seconds": 0.2})
    with ready_client(settings, lambda: tiny_segmenter) as client:
        yield client


def test_another_label_set_or_k_reuses_the_cached_encoding(cached_client, image_server):
    client, tasks = cached_client, image_tasks(f"{image_server}/china.jpg", first_id=7)
    assert predictions(client, tasks, CONFIG, project=PROJECT)[0]["result"]
    client.app.state.cache_writer.flush()
    encoded = stage_count(client, "caption"), stage_count(client, "features")
    assert encoded == (1, 1)
    fewer_labels = CONFIG.replace('<Label value="Cat"/>', "").replace('model_refine="none"', 'model_refine="none" model_k="6"')
    assert predictions(client, tasks, fewer_labels, project=PROJECT)[0]["result"]
    assert (stage_count(client, "caption"), stage_count(client, "features")) == encoded
    assert stage_count(client, "clustering") == 2
    metrics = client.get("/metrics").text
    assert metric(metrics, "freeseg_feature_cache_hits_total") == 1
    assert metric(metrics, "freeseg_feature_cache_misses_total") == 1
    assert metric(metrics, "freeseg_feature_cache_written_bytes_total") > 100_000


def test_clicks_return_the_region_under_each_point_with_its_label(cached_client, image_server, tiny_segmenter, china):
    client, tasks = cached_client, image_tasks(f"{image_server}/china.jpg", first_id=7)
    features = tiny_segmenter.features([china])[0]  # the extractor itself: no stage is observed
    grid = cluster_feature_grid(features.astype(np.float32), 4, 0)
    masks = cluster_masks(grid, 427, 640)
    first = (60, 40)  # (x, y) pixels
    other = np.argwhere(~masks[masks[:, first[1], first[0]].argmax()])[len(np.argwhere(~masks[0])) // 2]
    second = (int(other[1]), int(other[0]))

    def click(point, label):
        return {"type": "keypointlabels", "from_name": "click", "to_name": "image", "original_width": 640,
                "original_height": 427, "value": {"x": 100 * point[0] / 640, "y": 100 * point[1] / 427,
                                                  "keypointlabels": [label]}}

    [one] = predictions(client, tasks, CONFIG, project=PROJECT, params={"context": {"result": [click(first, "Sky")]}})
    assert [r["value"]["brushlabels"] for r in one["result"]] == [["Sky"]]
    client.app.state.cache_writer.flush()
    [two] = predictions(client, tasks, CONFIG, project=PROJECT,
                        params={"context": {"result": [click(first, "Sky"), click(second, "Tree")]}})
    assert sorted(r["value"]["brushlabels"][0] for r in two["result"]) == ["Sky", "Tree"]
    assert stage_count(client, "features") == 1  # the clicks were answered from the cache


def test_typed_words_steer_the_labels(cached_client, image_server):
    client, tasks = cached_client, image_tasks(f"{image_server}/china.jpg", first_id=7)
    typed = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["sofa"]}}]}
    result = predictions(client, tasks, CONFIG, project=PROJECT, params={"context": typed})[0]["result"]
    assert result and {r["value"]["brushlabels"][0] for r in result} == {"Couch"}


def test_a_click_with_an_unknown_label_is_a_clear_400(cached_client, image_server):
    context = {"result": [{"type": "keypointlabels", "value": {"x": 5, "y": 5, "keypointlabels": ["Dragon"]}}]}
    response = predict(cached_client, image_tasks(f"{image_server}/china.jpg"), CONFIG, params={"context": context})
    assert response.status_code == 400 and "Dragon" in response.json()["error"]


def test_redis_killed_mid_run_predictions_go_on_and_the_cache_comes_back(start_redis, tiny_settings, tiny_segmenter,
                                                                       image_server, caplog):
    caplog.set_level(logging.INFO, logger="backend.storage.feature_cache")
    server = start_redis()
    settings = tiny_settings.model_copy(update={"redis_url": server.url, "cache_retry_after_seconds": 0.2})
    china = image_tasks(f"{image_server}/china.jpg", first_id=7)
    flower = image_tasks(f"{image_server}/flower.jpg", first_id=7)
    with ready_client(settings, lambda: tiny_segmenter) as client:
        assert predictions(client, china, CONFIG, project=PROJECT)[0]["result"]
        client.app.state.cache_writer.flush()
        server.stop()
        assert predictions(client, china, CONFIG, project=PROJECT)[0]["result"]  # computed without the cache
        assert metric(client.get("/metrics").text, "freeseg_feature_cache_errors_total") >= 1
        server.start()  # empty again: no persistence
        time.sleep(0.3)
        assert predictions(client, flower, CONFIG, project=PROJECT)[0]["result"]
        client.app.state.cache_writer.flush()
        before = stage_count(client, "features")
        assert predictions(client, flower, CONFIG, project=PROJECT)[0]["result"]
        assert stage_count(client, "features") == before  # served from Redis again
    messages = [record.getMessage() for record in caplog.records]
    assert sum("is unavailable" in m and "going on without it" in m for m in messages) == 1  # one clear line
    assert any(m.startswith("feature cache is back") for m in messages)


def _serve(port: int, redis_url: str, model_dir) -> subprocess.Popen:
    env = {**os.environ, "FREESEG_MODELS": "tiny", "FREESEG_DEVICE": "cpu", "MODEL_DIR": str(model_dir),
           "HF_HUB_OFFLINE": "1", "REDIS_URL": redis_url, "LOG_LEVEL": "WARNING", "FREESEG_ALLOW_PRIVATE_URLS": "true",
           "OMP_NUM_THREADS": "1"}  # two servers on this machine's cores (docs/jobs.md, "Workers on many machines")
    command = [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_two_server_processes_share_the_cache(start_redis, tiny_settings, image_server):
    server = start_redis()
    ports = [free_port(), free_port()]
    processes = [_serve(port, server.url, tiny_settings.model_dir) for port in ports]
    try:
        for port in ports:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["model_state"] == "ready":
                        break
                except requests.RequestException:  # not listening yet, or slow to answer while it loads
                    pass
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        tasks = image_tasks(f"{image_server}/china.jpg")
        first = predict(f"http://127.0.0.1:{ports[0]}", tasks, CONFIG, timeout=120).json()
        with server.client() as raw:
            deadline = time.monotonic() + 30
            while not raw.keys("freeseg:enc:*"):
                assert time.monotonic() < deadline, "the first process never wrote its encoding"
                time.sleep(0.1)
        second = predict(f"http://127.0.0.1:{ports[1]}", tasks, CONFIG, timeout=120).json()
        assert second["results"] == first["results"]
        metrics = requests.get(f"http://127.0.0.1:{ports[1]}/metrics", timeout=5).text
        assert metric(metrics, "freeseg_feature_cache_hits_total") == 1
        assert 'freeseg_stage_seconds_count{stage="features"}' not in metrics
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
