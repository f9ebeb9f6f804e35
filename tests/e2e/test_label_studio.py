"""End to end: the backend served over HTTP, a real Label Studio calling it, a real browser showing the result.

Runs ``python -m backend.cli serve`` with the tiny random models, connects it to a fresh project of a real
Label Studio 1.23.2, asks for predictions of an uploaded image and of an image at a plain http URL, checks
the stored brush masks, and opens the task in headless Chromium to see the predicted region listed under
its label. The screenshot goes to ``artifacts/e2e/label-studio-task.png``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sklearn
import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from labelstudio import (
    BrowserCheck,
    LabelStudioServer,
    connect_ml_backend,
    create_project,
    free_port,
    get_ml_backend,
    interactive_annotating,
    import_image_file,
    import_image_url,
    list_predictions,
    log_tail,
    retrieve_predictions,
    set_project_model_version,
    stop_process,
)
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts" / "e2e"
SCREENSHOT = ARTIFACTS / "label-studio-task.png"
STREAM_SCREENSHOT = ARTIFACTS / "label-studio-stream.png"
FEEDBACK_CHART = ARTIFACTS / "feedback-chart.png"
IMAGES = Path(sklearn.__file__).parent / "datasets" / "images"  # china.jpg and flower.jpg, 640x427

LABELS = ("building", "tree", "sky")
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + "</BrushLabels>"
    '<KeyPointLabels name="click" toName="image" smart="true">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + "</KeyPointLabels></View>"
)
HEALTH_TIMEOUT = 180.0  # seconds for the backend to load its models and report ready


# The e2e runs' figures and thresholds (the memory's mIoU gains) were measured with the tiny BLIP-2's captions;
# FREESEG_CAPTIONER=auto picks BLIP base on a CPU. Every process of an e2e test captions alike.
E2E_CAPTIONER = "blip2"


def backend_command(port: int) -> list[str]:
    return [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]


def backend_env(model_dir: Path, label_studio: LabelStudioServer, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FREESEG_MODELS": "tiny",
            "FREESEG_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "MODEL_DIR": str(model_dir),
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "FREESEG_ALLOW_PRIVATE_URLS": "true",  # the flower task's URL is on 127.0.0.1
            "FREESEG_CAPTIONER": E2E_CAPTIONER,
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


@contextlib.contextmanager
def run_backend(work_dir: Path, label_studio: LabelStudioServer, **extra_env: str) -> Iterator[str]:
    """Starts the backend's HTTP server (``extra_env`` added to its environment); yields its URL once ``/health``
    reports it ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work_dir / "backend.log"
    model_dir = work_dir / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            backend_command(port),
            cwd=REPO_ROOT,
            env=backend_env(model_dir, label_studio, **extra_env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_ready(url, process, log_path, HEALTH_TIMEOUT)
        yield url
    finally:
        stop_process(process)
        print(f"backend log {log_path}:\n{log_tail(log_path, 30)}")


def wait_until_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> dict:
    """Polls ``GET /health`` until it answers ``"status": "UP"`` and ``"model_state": "ready"``."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the backend exited with code {process.returncode}; log {log_path}:\n{log_tail(log_path)}")
        try:
            response = requests.get(url + "/health", timeout=5)
            last = f"HTTP {response.status_code}: {response.text[:500]}"
            if response.ok:
                health = response.json()
                if health.get("status") == "UP" and health.get("model_state") == "ready":
                    return health
        except (requests.RequestException, ValueError) as error:
            last = f"{type(error).__name__}: {error}"
        time.sleep(0.5)
    pytest.fail(f"the backend was not ready within {timeout:.0f} s (last /health: {last}); "
                f"log {log_path}:\n{log_tail(log_path)}")


def correct_first_region(results: list[dict]) -> list[dict]:
    """The prediction's regions with every other row of the first region's mask erased (IoU about 0.5)."""
    corrected = [json.loads(json.dumps(region)) for region in results]
    first = corrected[0]
    height, width = first["original_height"], first["original_width"]
    mask = decode_rle(first["value"]["rle"]).reshape(height, width, 4)[:, :, 3].copy()
    mask[::2] = 0
    first["value"]["rle"] = [int(v) for v in mask2rle(np.where(mask > 0, 255, 0).astype(np.uint8))]
    for region in corrected:
        region.pop("score", None)
        region["origin"] = "manual"
    return corrected


def stage_count(backend_url: str, stage: str) -> float:
    """How many times the backend ran a pipeline stage, from its /metrics."""
    text = requests.get(backend_url + "/metrics", timeout=10).text
    match = re.search(rf'freeseg_stage_seconds_count{{stage="{stage}"}} ([0-9.]+)', text)
    return float(match.group(1)) if match else 0.0


def check_brush_regions(predictions: list[dict], image_path: Path) -> list[dict]:
    """Asserts that the task's stored predictions hold brush regions that fit the image; returns them."""
    with Image.open(image_path) as image:
        width, height = image.size
    assert (width, height) == (640, 427), f"unexpected test image size {width}x{height}"
    regions = [region for prediction in predictions for region in prediction["result"]]
    assert regions, f"no region predicted for {image_path.name}: {json.dumps(predictions)[:1000]}"
    for region in regions:
        assert region["type"] == "brushlabels", region
        assert (region["from_name"], region["to_name"]) == ("tag", "image"), region
        assert (region["original_width"], region["original_height"]) == (width, height), region
        value = region["value"]
        assert value["format"] == "rle"
        assert value["brushlabels"], f"a region without a label renders unlabeled: {region['id']}"
        assert set(value["brushlabels"]) <= set(LABELS), value["brushlabels"]
        flat = decode_rle(value["rle"])
        assert flat.size == height * width * 4, f"mask of {flat.size // 4} pixels for a {width}x{height} image"
        mask = flat.reshape(height, width, 4)[:, :, 3]
        assert mask.shape == (height, width)
        assert mask.any(), f"empty mask for {value['brushlabels']} on {image_path.name}"
    return regions


@pytest.mark.e2e
def test_label_studio_pre_annotates_and_shows_brush_masks(
    label_studio: LabelStudioServer, image_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.perf_counter()
    upload = tmp_path / "china.jpg"
    shutil.copyfile(IMAGES / "china.jpg", upload)

    with run_backend(tmp_path, label_studio) as backend_url:
        project = create_project(label_studio, LABEL_CONFIG, title="freesegdiff e2e")
        china = import_image_file(label_studio, project, upload)
        flower = import_image_url(label_studio, project, f"{image_server}/flower.jpg")
        images = {china: IMAGES / "china.jpg", flower: IMAGES / "flower.jpg"}
        ml_backend = connect_ml_backend(label_studio, project, backend_url, title="freesegdiff")

        retrieve_started = time.perf_counter()
        answer = retrieve_predictions(label_studio, project)
        retrieve_seconds = time.perf_counter() - retrieve_started

        regions: dict[int, list[dict]] = {}
        versions = set()
        for task, image_path in images.items():
            predictions = list_predictions(label_studio, task)
            assert predictions, f"no prediction stored for task {task} ({image_path.name}); the action said {answer}"
            regions[task] = check_brush_regions(predictions, image_path)
            versions.update(prediction["model_version"] for prediction in predictions)
        assert len(versions) == 1 and "" not in versions, f"predictions carry model versions {versions}"
        model_version = versions.pop()
        # Label Studio keeps the model_version /setup answered; it must be the predictions' own, or every
        # "retrieve predictions" predicts (and stores) again, and the live labeling stream finds nothing.
        setup_version = get_ml_backend(label_studio, ml_backend)["model_version"]
        assert setup_version == model_version, f"/setup says {setup_version!r}, predictions say {model_version!r}"

        # Label Studio set the project's model_version to the backend's title when it was connected; the
        # "label all tasks" stream shows stored predictions only when it equals theirs.
        set_project_model_version(label_studio, project, model_version, show_collab_predictions=True)

        # Interactive pre-annotation: a click answered from the feature cache, without the diffusion model.
        encoded_before = stage_count(backend_url, "features")
        click = {"type": "keypointlabels", "from_name": "click", "to_name": "image", "original_width": 640,
                 "original_height": 427, "value": {"x": 20.0, "y": 15.0, "keypointlabels": ["tree"]}}
        clicked = interactive_annotating(label_studio, ml_backend, china, {"result": [click]})
        assert "data" in clicked, f"interactive annotating failed: {clicked}"
        assert [r["value"]["brushlabels"] for r in clicked["data"]["result"]] == [["tree"]], clicked
        assert check_brush_regions([clicked["data"]], IMAGES / "china.jpg")
        assert stage_count(backend_url, "features") == encoded_before, "the click ran the diffusion model again"

        label = regions[china][0]["value"]["brushlabels"][0]
        with BrowserCheck(label_studio) as browser:
            task_view = browser.task_regions(project, china, screenshot=SCREENSHOT)
            stream_view = browser.stream_regions(project, screenshot=STREAM_SCREENSHOT)

        # Feedback: an annotator corrects the prediction (half of the first region's rows erased); Label Studio's
        # webhook tells the backend, which compares, and `freesegdiff report` shows it.
        prediction = list_predictions(label_studio, china)[0]
        corrected = correct_first_region(prediction["result"])
        label_studio.api("POST", f"/api/tasks/{china}/annotations/",
                         json={"result": corrected, "parent_prediction": prediction["id"]})
        feedback_file = tmp_path / "models" / "feedback" / f"feedback-{project}.jsonl"
        deadline = time.monotonic() + 60
        while not feedback_file.exists():
            assert time.monotonic() < deadline, "the backend recorded no feedback for the corrected annotation"
            time.sleep(0.5)
        report = subprocess.run(
            [sys.executable, "-m", "backend.cli", "report", "--project", str(project), "--chart", str(FEEDBACK_CHART)],
            env={**os.environ, "MODEL_DIR": str(tmp_path / "models")}, capture_output=True, text=True, timeout=120,
            cwd=REPO_ROOT,
        )
        assert report.returncode == 0, report.stderr
        first_label = prediction["result"][0]["value"]["brushlabels"][0]
        assert first_label in report.stdout and "edited" in report.stdout.lower()
        assert FEEDBACK_CHART.stat().st_size > 0


    assert SCREENSHOT.stat().st_size > 0
    assert label in task_view.titles, f"region list {task_view.regions}, expected {label!r}"
    assert any(region.predicted for region in task_view.regions if region.title == label), task_view
    assert "prediction" in task_view.store_origins, task_view
    predicted_labels = {value for task_regions in regions.values() for region in task_regions
                        for value in region["value"]["brushlabels"]}
    stream_predicted = {region.title for region in stream_view.regions if region.predicted}
    assert stream_predicted & predicted_labels, f"the labeling stream shows {stream_view}"

    duration = time.perf_counter() - started
    with capsys.disabled():
        print(
            f"\ne2e: whole test {duration:.1f} s; retrieve predictions {retrieve_seconds:.2f} s for {len(images)} "
            f"tasks = {retrieve_seconds / len(images):.2f} s per task; model_version {model_version!r}; "
            f"regions shown {task_view.titles}; screenshot {SCREENSHOT}\nfeedback report:\n{report.stdout}"
        )
