"""End to end: a project's annotations teach its later predictions, and no other project's.

Two projects of a real Label Studio 1.23.2 with the same labels and the same synthetic scenes
(``backend.evaluation.synthetic``: exact ground truth) are connected to one backend (tiny random
models: random-weight mechanics, what learning gains comes from the memory alone). The
ground truth of the first few tasks of one project is submitted as annotations; Label Studio's
webhooks make the backend learn them. Retrieving predictions again then re-predicts that
project's tasks (its ``/setup`` answers a new ``model_version``), and not the other's.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from labelstudio import (LabelStudioServer, connect_ml_backend, create_project, import_image_file, list_predictions,
                         retrieve_predictions)
from PIL import Image
from test_label_studio import run_backend

from backend.evaluation.scores import ConfusionMatrix
from backend.evaluation.synthetic import CLASSES, write_scenes

SCENES, TAUGHT = 8, 4
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                + "".join(f'<Label value="{name}"/>' for name in CLASSES[1:]) + "</BrushLabels></View>")
LEARN_TIMEOUT = 300.0


def ground_truth_result(truth: np.ndarray) -> list[dict]:
    """One brush region per class present, as an annotator would submit it."""
    height, width = truth.shape
    return [{"type": "brushlabels", "from_name": "tag", "to_name": "image", "origin": "manual",
             "original_width": width, "original_height": height, "image_rotation": 0,
             "value": {"format": "rle", "brushlabels": [CLASSES[value]],
                       "rle": [int(v) for v in mask2rle(np.where(truth == value, 255, 0).astype(np.uint8))]}}
            for value in np.unique(truth) if value > 0]


def label_map(prediction: dict, shape: tuple[int, int]) -> np.ndarray:
    """The prediction's regions as class ids (0 where no region)."""
    result = np.zeros(shape, np.uint8)
    for region in prediction["result"]:
        mask = decode_rle(region["value"]["rle"]).reshape(*shape, 4)[:, :, 3] > 0
        result[mask] = CLASSES.index(region["value"]["brushlabels"][0])
    return result


def latest(server: LabelStudioServer, task: int) -> dict:
    return max(list_predictions(server, task), key=lambda prediction: prediction["id"])


def miou(server: LabelStudioServer, tasks: list[int], truths: list[np.ndarray]) -> float:
    matrix = ConfusionMatrix(len(CLASSES))
    for task, truth in zip(tasks, truths):
        matrix.update(label_map(latest(server, task), truth.shape), truth)
    return matrix.miou()


def learned(backend_url: str) -> float:
    text = requests.get(backend_url + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines()
             if line.startswith('freeseg_learning_events_total{action="learn",outcome="done"}')]
    return float(lines[0].split()[-1]) if lines else 0.0


def wait_for_learned(backend_url: str, count: int) -> None:
    """Until the backend has learned ``count`` annotations (its webhooks run in the background)."""
    deadline = time.monotonic() + LEARN_TIMEOUT
    while learned(backend_url) < count:
        assert time.monotonic() < deadline, f"the backend learned {learned(backend_url)} of {count} annotations"
        time.sleep(0.5)


def submit_truth(server: LabelStudioServer, task: int, truth: np.ndarray) -> None:
    """Submit ``truth`` as the task's annotation, as an annotator would."""
    server.api("POST", f"/api/tasks/{task}/annotations/", json={"result": ground_truth_result(truth)})


def scenes_in_projects(server: LabelStudioServer, folder: Path, count: int, seed: int,
                       titles: tuple[str, ...]) -> tuple[list[np.ndarray], list[int], list[list[int]]]:
    """``count`` synthetic scenes imported into one new project per title: their truths, the projects, and
    each project's tasks in import order."""
    scenes = write_scenes(folder, count, seed=seed, height=96, width=128)
    images = sorted((scenes / "images").glob("*.png"))
    truths = [np.asarray(Image.open(scenes / "labels" / image.name)) for image in images]
    projects = [create_project(server, LABEL_CONFIG, title=title) for title in titles]
    return truths, projects, [[import_image_file(server, project, image) for image in images] for project in projects]


def connect_and_predict(server: LabelStudioServer, projects: list[int], backend_url: str) -> None:
    for project in projects:
        connect_ml_backend(server, project, backend_url)
        retrieve_predictions(server, project)


@pytest.mark.e2e
def test_annotations_teach_their_project_and_no_other(label_studio: LabelStudioServer, tmp_path: Path):
    truths, projects, (taught_tasks, other_tasks) = scenes_in_projects(
        label_studio, tmp_path / "scenes", SCENES, 0, ("learning taught", "learning other"))
    with run_backend(tmp_path / "backend", label_studio) as backend_url:
        connect_and_predict(label_studio, projects, backend_url)
        later = slice(TAUGHT, None)
        before_taught = miou(label_studio, taught_tasks[later], truths[later])
        before_other = miou(label_studio, other_tasks[later], truths[later])
        other_predictions = [list_predictions(label_studio, task) for task in other_tasks]
        (untaught_version,) = {latest(label_studio, task)["model_version"] for task in taught_tasks[later]}

        for task, truth in zip(taught_tasks[:TAUGHT], truths[:TAUGHT]):
            submit_truth(label_studio, task, truth)
        wait_for_learned(backend_url, TAUGHT)

        for project in projects:
            retrieve_predictions(label_studio, project)
        after_taught = miou(label_studio, taught_tasks[later], truths[later])
        after_other = miou(label_studio, other_tasks[later], truths[later])
        versions = {latest(label_studio, task)["model_version"] for task in taught_tasks[later]}

    print(f"\nmIoU (%) of the {SCENES - TAUGHT} later tasks, {TAUGHT} tasks of the taught project annotated:\n"
          f"  taught project: {before_taught:.2f} before, {after_taught:.2f} after\n"
          f"  other project:  {before_other:.2f} before, {after_other:.2f} after\n"
          f"  taught project's model_version now {sorted(versions)}")
    # one version, the memory's revision as a suffix: a change's revision is at least the clock in milliseconds
    assert len(versions) == 1 and re.fullmatch(re.escape(untaught_version) + r"-m\d{13}", versions.pop())
    assert [list_predictions(label_studio, task) for task in other_tasks] == other_predictions
    assert after_other == before_other
    assert after_taught >= before_taught + 10 and after_taught >= after_other + 10
