"""End to end: tasks taken in Label Studio's own order by prediction score, lowest first, beside import order.

Two projects of a real Label Studio 1.23.2 hold the same synthetic scenes (exact ground truth) and one
backend (tiny random models: random-weight mechanics). The last ``HELD_OUT`` tasks of each are never
annotated; they are what both projects' figures score. In one project an annotator takes, ``TAUGHT``
times, the first unannotated task of the data manager sorted by prediction score (lowest first),
submits its ground truth, lets the webhook teach the backend and retrieves predictions again, which
brings fresh scores: the memory's new revision is a new ``model_version``. Label Studio 1.23.2 sorts
by the mean score of the predictions of the project's ``model_version`` only, so the annotator selects
the newest version in the project's settings each time (here through the API). In the other project
the first ``TAUGHT`` tasks in import order are annotated.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from labelstudio import LabelStudioServer, retrieve_predictions, set_project_model_version, tasks_by_prediction_score
from test_label_studio import run_backend
from test_learning import (connect_and_predict, latest, miou, scenes_in_projects, submit_truth,
                           wait_for_learned)

SCENES, HELD_OUT, TAUGHT = 10, 4, 3


def use_newest_predictions(server: LabelStudioServer, project: int, task: int) -> str:
    """Select the newest predictions' model_version in the project, as an annotator does in its settings."""
    version = latest(server, task)["model_version"]
    set_project_model_version(server, project, version)
    return version


@pytest.mark.e2e
@pytest.mark.slow
def test_tasks_taken_by_prediction_score_beside_import_order(label_studio: LabelStudioServer, tmp_path: Path):
    truths, (by_score, by_import), (score_tasks, import_tasks) = scenes_in_projects(
        label_studio, tmp_path / "scenes", SCENES, 1, ("taken by prediction score", "taken in import order"))
    held = slice(SCENES - HELD_OUT, None)
    with run_backend(tmp_path / "backend", label_studio) as backend_url:
        connect_and_predict(label_studio, [by_score, by_import], backend_url)
        before = miou(label_studio, score_tasks[held], truths[held])
        assert miou(label_studio, import_tasks[held], truths[held]) == before  # the same tasks, the same models

        taken, score_lists, versions = [], [], []
        for round_ in range(TAUGHT):
            versions.append(use_newest_predictions(label_studio, by_score, score_tasks[0]))
            ordered = tasks_by_prediction_score(label_studio, by_score)
            scores = [task["predictions_score"] for task in ordered]
            score_lists.append(scores)
            if round_ == 0:
                first_scores = {task["id"]: task["predictions_score"] for task in ordered}
            assert None not in scores and scores == sorted(scores), scores  # Label Studio's own order, lowest first
            task = next(task["id"] for task in ordered
                        if task["id"] in score_tasks[:held.start] and task["id"] not in taken)
            taken.append(task)
            truth = truths[score_tasks.index(task)]
            submit_truth(label_studio, task, truth)
            wait_for_learned(backend_url, round_ + 1)
            retrieve_predictions(label_studio, by_score)  # /setup answers the memory's new version: all re-predicted
        versions.append(use_newest_predictions(label_studio, by_score, score_tasks[0]))
        after_score = miou(label_studio, score_tasks[held], truths[held])
        final_scores = {task["id"]: task["predictions_score"] for task in tasks_by_prediction_score(label_studio,
                                                                                                  by_score)}

        for task, truth in zip(import_tasks[:TAUGHT], truths[:TAUGHT]):
            submit_truth(label_studio, task, truth)
        wait_for_learned(backend_url, 2 * TAUGHT)
        retrieve_predictions(label_studio, by_import)
        after_import = miou(label_studio, import_tasks[held], truths[held])

    print(f"\nmIoU (%) of the {HELD_OUT} held-out tasks, {TAUGHT} tasks annotated of {SCENES - HELD_OUT}:\n"
          f"  before any annotation: {before:.2f}\n"
          f"  taken by prediction score (tasks {[score_tasks.index(t) for t in taken]} in import order): "
          f"{after_score:.2f}\n"
          f"  taken in import order (tasks {list(range(TAUGHT))}): {after_import:.2f}\n"
          f"  prediction scores Label Studio sorted by, each round: "
          f"{[[round(s, 3) for s in scores] for scores in score_lists]}\n"
          f"  model versions selected: {versions}")
    assert len(set(versions)) == TAUGHT + 1  # each annotation taught made a new version
    assert all(task not in score_tasks[held] for task in taken)
    # fresh scores reached Label Studio: the held-out tasks' scores changed with the memory
    assert [final_scores[task] for task in score_tasks[held]] != [first_scores[task] for task in score_tasks[held]]
