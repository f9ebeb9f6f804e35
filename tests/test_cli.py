"""``freesegdiff segment`` as a user runs it: a real process, real files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image
import sklearn

pytestmark = pytest.mark.slow  # a real freesegdiff process for each test

CHINA = Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"
LABELS = ["building", "tree", "sky"]


def _run(args: list[str], tiny_settings) -> subprocess.CompletedProcess:
    env = {**os.environ, "FREESEG_MODELS": "tiny", "FREESEG_DEVICE": "cpu", "MODEL_DIR": str(tiny_settings.model_dir),
           "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "backend.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, tiny_settings):
    folder = tmp_path_factory.mktemp("cli")
    broken = folder / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    flower = folder / "flower.jpg"
    shutil.copy(CHINA.with_name("flower.jpg"), flower)
    out = folder / "out"
    result = _run(["segment", str(CHINA), str(broken), str(flower), "--labels", ",".join(LABELS),
                   "--out", str(out)], tiny_settings)
    return result, out


def test_writes_prediction_label_map_and_overlay(segmented):
    result, out = segmented
    assert {p.name for p in out.iterdir()} == {
        "china.json", "china.png", "china_overlay.png", "flower.json", "flower.png", "flower_overlay.png"
    }
    prediction = json.loads((out / "china.json").read_text())
    assert prediction["model_version"].endswith("tiny-random-weights")
    assert 0 <= prediction["score"] <= 1
    label_map = np.asarray(Image.open(out / "china.png"))
    assert label_map.shape == (427, 640) and label_map.max() <= len(LABELS)
    assert prediction["result"], "a real photo must yield at least one region"
    for region in prediction["result"]:
        label = region["value"]["brushlabels"][0]
        mask = np.reshape(decode_rle(region["value"]["rle"]), (427, 640, 4))[:, :, 3] > 0
        np.testing.assert_array_equal(mask, label_map == LABELS.index(label) + 1)
        assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "label", "image")
    overlay = Image.open(out / "china_overlay.png")
    assert overlay.width == 640 and overlay.height > 427  # the legend sits below the image


def test_unreadable_image_is_one_line_and_a_failing_exit(segmented):
    result, _ = segmented
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "broken.jpg" in line]
    assert len(errors) == 1 and "not a recognised image" in errors[0]


def test_missing_weights_exit_with_the_setting_named(tmp_path):
    env = {**os.environ, "FREESEG_MODELS": "pretrained", "FREESEG_SD_MODEL": str(tmp_path / "none"),
           "HF_HUB_OFFLINE": "1", "FREESEG_DEVICE": "cpu"}
    result = subprocess.run([sys.executable, "-m", "backend.cli", "segment", str(CHINA), "--labels", "sky",
                             "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "FREESEG_SD_MODEL" in result.stderr
