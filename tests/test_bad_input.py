"""Bad input, end to end: each bad task, file, config or body gets its own specific error.

The same images go through ``/predict`` over HTTP (as task URLs, all in one request with
a good task, which must be unaffected) and through ``freesegdiff segment`` (as files, in
one run). Valid but unusual images (16-bit, CMYK, EXIF-rotated) must give a correct
result instead. Afterwards the server must still be healthy. The single pieces are
tested in test_images.py, test_labelstudio_images.py, test_fetch.py and test_labelstudio_config.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend.cli import main as cli_main
from tests.test_images import encode, png_declaring
from tests.app_client import image_tasks, predict
from tests.http_server import RecordingServer, send, serving
from tests.test_security import running

TOKEN = "bad-input-token"
PROJECT = "8.8"
FETCH_TIMEOUT = 1.0
LABELS = ("building", "tree", "sky")
# No refinement: it may empty a small cluster of a random-weight model, and every valid image must give regions.
CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image" model_k="3" model_refine="none">
    {"".join(f'<Label value="{label}"/>' for label in LABELS)}
  </BrushLabels>
</View>"""

# Expected errors: the text each bad image's error must contain, through /predict and through the CLI.
DECODE_ERRORS = {
    "corrupt.jpg": "corrupt JPEG header",
    "truncated.jpg": "corrupt or truncated image",
    "empty.png": "empty file",
    "bomb.png": "30000x30000 = 900000000 pixels, over the limit of 50000000 pixels",
}
FETCH_ERRORS = {
    "/missing.png": "HTTP 404",
    "/data/upload/private.png": "HTTP 401 Unauthorized; check LABEL_STUDIO_API_KEY",
    "/never.png": f"did not finish within {FETCH_TIMEOUT:g} s (FREESEG_FETCH_TIMEOUT)",
    "/drip.png": f"did not finish within {FETCH_TIMEOUT:g} s (FREESEG_FETCH_TIMEOUT)",
}


# --- the inputs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(china: np.ndarray) -> Image.Image:
    """A small real photo, so that every valid image is segmented in well under a second."""
    return Image.fromarray(china).resize((96, 64))


@pytest.fixture(scope="module")
def unusual_images(photo: Image.Image) -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Valid images that naive decoding gets wrong: name -> (bytes, displayed height and width)."""
    grey = np.asarray(photo.convert("L"), dtype=np.uint16) * 257  # the full 16-bit range
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return {
        "sixteen-bit.png": (encode(Image.fromarray(grey), "PNG"), (64, 96)),
        "cmyk.jpg": (encode(photo.convert("CMYK"), "JPEG", quality=95), (64, 96)),
        "rotated.jpg": (encode(photo, "JPEG", exif=exif.tobytes(), quality=95), (96, 64)),
    }


@pytest.fixture(scope="module")
def broken_images(photo: Image.Image) -> dict[str, bytes]:
    jpeg = encode(photo, "JPEG", quality=90)
    return {
        "corrupt.jpg": b"\xff\xd8\xff\xe0 definitely not a whole jpeg",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.png": b"",
        "bomb.png": png_declaring(30000, 30000),
    }


def never_answers(handler: BaseHTTPRequestHandler) -> None:
    time.sleep(FETCH_TIMEOUT * 5)


def drips(handler: BaseHTTPRequestHandler) -> None:
    """Sends a byte every 0.1 s: each read gets data in time, only the whole download's deadline stops it."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    try:
        for _ in range(1000):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)
    except OSError:  # the backend hung up at its deadline
        pass


@pytest.fixture(scope="module")
def web(photo, unusual_images, broken_images) -> Iterator[RecordingServer]:
    """An image host: every image by name, plus a URL that never answers and one that drips."""
    with RecordingServer() as server:
        files = {name: data for name, (data, _) in unusual_images.items()} | broken_images
        files["photo.png"] = encode(photo, "PNG")  # a plain good image
        for name, data in files.items():
            server.routes[f"/{name}"] = serving(data)
        server.routes["/never.png"] = never_answers
        server.routes["/drip.png"] = drips
        yield server


@pytest.fixture(scope="module")
def label_studio() -> Iterator[RecordingServer]:
    """Label Studio refusing our token for its uploads."""
    with RecordingServer() as server:
        server.routes["/data/upload/private.png"] = lambda handler: send(handler, 401, b"", {"Content-Type": "text/plain"})
        yield server


@pytest.fixture(scope="module")
def client(tiny_settings, tiny_segmenter, label_studio) -> Iterator[TestClient]:
    settings = tiny_settings.model_copy(update={
        "fetch_timeout": FETCH_TIMEOUT, "label_studio_url": label_studio.url, "label_studio_api_key": TOKEN,
        "max_request_bytes": 64 * 1024,
    })
    with running(settings, tiny_segmenter) as client:
        yield client


def task_errors(caplog: pytest.LogCaptureFixture) -> dict[int, str]:
    """The error logged for each failed task, by task id."""
    errors = {}
    for record in caplog.records:
        match = re.fullmatch(r"task (\d+): no prediction, its image failed: (.*)", record.getMessage())
        if match:
            errors[int(match.group(1))] = match.group(2)
    return errors


def assert_correct_prediction(prediction: dict, size: tuple[int, int]) -> None:
    """Regions with our labels whose masks cover the image as displayed (height, width)."""
    assert prediction["result"], "a valid photo gets at least one region"
    for region in prediction["result"]:
        assert (region["original_height"], region["original_width"]) == size
        assert region["value"]["brushlabels"][0] in LABELS
        mask = np.reshape(decode_rle(region["value"]["rle"]), (*size, 4))[:, :, 3]
        assert mask.any()


def assert_healthy(client: TestClient, web: RecordingServer) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "UP"
    assert health.json()["model_state"] == "ready" and health.json()["queue_depth"] == 0
    good = predict(client, image_tasks(f"{web.url}/photo.png", first_id=99), CONFIG, project=PROJECT)
    assert good.status_code == 200 and good.json()["results"][0]["result"]


# --- through /predict ----------------------------------------------------------------------


def test_every_bad_task_gets_its_own_error_and_the_other_tasks_are_predicted(
    client, web, label_studio, unusual_images, caplog
):
    caplog.set_level("WARNING", logger="backend.server.predictions")
    urls = [f"{web.url}/{name}" for name in DECODE_ERRORS]
    urls += [path if path.startswith("/data/") else f"{web.url}{path}" for path in FETCH_ERRORS]  # /data/: Label Studio's
    urls += [f"{web.url}/{name}" for name in unusual_images] + [f"{web.url}/photo.png"]
    tasks = image_tasks(*urls, first_id=0)

    response = predict(client, tasks, CONFIG, project=PROJECT)

    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(tasks)
    expected = list(DECODE_ERRORS.values()) + list(FETCH_ERRORS.values())
    errors = task_errors(caplog)
    assert sorted(errors) == list(range(len(expected)))
    for index, wanted in enumerate(expected):
        assert wanted in errors[index], (urls[index], errors[index])
        assert results[index]["result"] == [] and results[index]["score"] == 0
    for index, (_, size) in enumerate(unusual_images.values(), start=len(expected)):
        assert_correct_prediction(results[index], size)
    assert_correct_prediction(results[-1], (64, 96))
    assert label_studio.requests[-1].headers["Authorization"] == f"Token {TOKEN}"
    metrics = client.get("/metrics").text
    for kind in ("image_decode", "image_http_404", "image_http_401", "image_timeout"):
        assert f'freeseg_errors_total{{kind="{kind}"}}' in metrics
    assert_healthy(client, web)


def test_downloads_stop_at_their_deadline(client, web):
    """The dripping server would hold the download for 100 s with only a per-read timeout."""
    for path in ("/never.png", "/drip.png"):
        started = time.monotonic()
        response = predict(client, image_tasks(f"{web.url}{path}"), CONFIG, project=PROJECT)
        assert time.monotonic() - started < FETCH_TIMEOUT + 0.5, path
        assert response.status_code == 200 and response.json()["results"][0]["result"] == []
    assert 'freeseg_errors_total{kind="image_timeout"} ' in client.get("/metrics").text


def test_a_requests_downloads_stop_at_its_budget(tiny_settings, tiny_segmenter, web, caplog):
    """Four images that never come cost FREESEG_FETCH_BUDGET_SECONDS, not four FREESEG_FETCH_TIMEOUTs in series;
    the image fetched in time is predicted."""
    caplog.set_level("WARNING", logger="backend.server.predictions")
    budget = 1.5
    settings = tiny_settings.model_copy(update={"fetch_timeout": FETCH_TIMEOUT, "fetch_budget_seconds": budget})
    urls = [f"{web.url}/photo.png"] + [f"{web.url}/never.png"] * 4
    with running(settings, tiny_segmenter) as client:
        started = time.time()  # the log records' clock
        response = predict(client, image_tasks(*urls, first_id=0), CONFIG, project=PROJECT)

    assert response.status_code == 200
    results = response.json()["results"]
    assert_correct_prediction(results[0], (64, 96))
    assert all(result["result"] == [] for result in results[1:])
    errors = task_errors(caplog)
    assert sorted(errors) == [1, 2, 3, 4]
    assert "did not finish within 1 s (FREESEG_FETCH_TIMEOUT)" in errors[1]
    for index in (3, 4):
        assert "(FREESEG_FETCH_BUDGET_SECONDS: 1.5 s for all the images of a request)" in errors[index]
    last_failure = max(record.created for record in caplog.records if record.getMessage().startswith("task 4:"))
    assert last_failure - started < budget + 0.5  # four timeouts in series took over 4 s


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ('<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/></Choices></View>',
         "no BrushLabels (or PolygonLabels) control"),
        (CONFIG.replace('<Label value="sky"/>', '<Label value="sky"/><Label value="Sky"/>'),
         '<BrushLabels name="tag"> repeats the label "Sky"; label values must be unique'),
    ],
    ids=["no-brushlabels", "repeated-labels"],
)
def test_unusable_configs_are_a_400_naming_the_problem(client, web, config, error):
    response = predict(client, image_tasks(f"{web.url}/photo.png"), config, project=PROJECT)
    assert response.status_code == 400 and error in response.json()["error"]
    setup = client.post("/setup", json={"project": "8.8", "schema": config})
    assert setup.status_code == 400 and error in setup.json()["error"]
    assert_healthy(client, web)


def test_bodies_far_over_the_limit_are_refused_whether_declared_or_streamed(client, web):
    body = json.dumps({"tasks": [{"id": 1, "data": {"image": "x" * 1024}}] * 4096}).encode()  # about 4 MiB
    limit = "over the limit of 65536 bytes (FREESEG_MAX_REQUEST_BYTES)"
    declared = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and limit in declared.json()["error"]
    pieces = (body[start : start + 8192] for start in range(0, len(body), 8192))  # no Content-Length
    streamed = client.post("/predict", content=pieces, headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and limit in streamed.json()["error"]
    assert_healthy(client, web)


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b"not json", 422, "JSON decode error"),
        (b'{"tasks": [', 422, "JSON decode error"),
        (b'{"tasks": "not a list"}', 422, "Input should be a valid list"),
        (b"\xff\xfe\x00", 400, "There was an error parsing the body"),  # not UTF-8
    ],
)
def test_bodies_that_are_not_the_protocols_json_are_refused(client, web, body, status, detail):
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status and detail in response.text
    assert_healthy(client, web)


# --- through freesegdiff segment -----------------------------------------------------------


@pytest.mark.slow
def test_segment_reports_each_unreadable_file_and_segments_the_rest(
    tmp_path, tiny_settings, unusual_images, broken_images
):
    for name, data in broken_images.items():
        (tmp_path / name).write_bytes(data)
    for name, (data, _) in unusual_images.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    paths = [str(tmp_path / name) for name in [*broken_images, *unusual_images]]
    env = {**os.environ, "FREESEG_MODELS": "tiny", "FREESEG_DEVICE": "cpu", "FREESEG_K": "3",
           "MODEL_DIR": str(tiny_settings.model_dir), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "backend.cli", "segment", *paths, "--labels", ",".join(LABELS),
                             "--refine", "none", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300, check=False)

    assert result.returncode == 1
    assert f"{len(broken_images)} of {len(paths)} images could not be read" in result.stderr
    for name, error in DECODE_ERRORS.items():
        [line] = [line for line in result.stderr.splitlines() if name in line]
        assert error in line
    for name, (_, size) in unusual_images.items():
        stem = Path(name).stem
        label_map = np.asarray(Image.open(out / f"{stem}.png"))
        assert label_map.shape == size and label_map.max() >= 1
        assert_correct_prediction(json.loads((out / f"{stem}.json").read_text()), size)
    assert not any((out / f"{Path(name).stem}.json").exists() for name in broken_images)


@pytest.mark.parametrize(
    ("labels", "error"),
    [(" , ", "--labels names no label"), ("cat,dog,Cat", "--labels repeats cat: label names must be unique")],
)
def test_segment_refuses_labels_it_cannot_number(tmp_path, caplog, labels, error):
    image = tmp_path / "x.png"
    image.write_bytes(encode(Image.new("RGB", (8, 8)), "PNG"))
    assert cli_main(["segment", str(image), "--labels", labels, "--out", str(tmp_path / "out")]) == 2
    assert error in caplog.text
    assert not (tmp_path / "out").exists()
