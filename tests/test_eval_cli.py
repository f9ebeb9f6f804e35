"""``freesegdiff eval``, on a tiny synthetic VOC-layout folder: with predictions, and with the tiny models."""

import json

import numpy as np
import pytest
from PIL import Image

from backend.cli import main


def _voc(root, ids):
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (252 * 3) + [224, 224, 192]
    for index, image_id in enumerate(ids):
        label = np.zeros((30, 40), dtype=np.uint8)
        label[:, 20:] = 15  # person
        label[0] = 255  # void border
        png = Image.fromarray(label, mode="P")
        png.putpalette(palette)
        png.save(root / "SegmentationClass" / f"{image_id}.png")
        Image.fromarray(np.full((30, 40, 3), 90 + 40 * index, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")


def test_eval_scores_label_index_predictions(tmp_path, capsys):
    root, predictions = tmp_path / "VOC2012", tmp_path / "predictions"
    _voc(root, ["a", "b"])
    predictions.mkdir()
    for image_id in ("a", "b"):
        label = np.zeros((30, 40), dtype=np.uint8)
        label[:, 30:] = 15  # half of the person found, nothing else predicted
        Image.fromarray(label).save(predictions / f"{image_id}.png")
    assert main(["eval", "--dataset", "voc", "--root", str(root), "--predictions", str(predictions),
                 "--json", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    # background: 20 columns right of 29 rows vs 30 predicted: IoU 20/30; person: 10/20 -> mean 58.33
    assert round(result["miou"], 2) == 58.33 and result["num_images"] == 2
    assert "mIoU 58.33" in capsys.readouterr().out


def test_eval_runs_the_pipeline_when_no_predictions_are_given(tmp_path, tiny_environment):
    root = tmp_path / "VOC2012"
    _voc(root, ["a"])
    assert main(["eval", "--dataset", "voc", "--root", str(root), "--json", str(tmp_path / "out.json"),
                 "--refine", "none"]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["num_images"] == 1 and 0 <= result["miou"] <= 100


@pytest.mark.slow
def test_eval_learn_in_confidence_order_with_a_held_out_set(tmp_path, tiny_environment, capsys):
    from backend.evaluation.synthetic import write_scenes

    root = write_scenes(tmp_path / "scenes", count=4, seed=0, height=48, width=64)
    out = tmp_path / "replay.json"
    assert main(["eval", "--learn", "--dataset", "folder", "--root", str(root), "--order", "confidence",
                 "--holdout", "2", "--refine", "none", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["order"] == "confidence" and result["holdout"] == 2
    assert sorted(result["taught_order"]) == ["scene-0000", "scene-0001"]
    assert [c["taught"] for c in result["checkpoints"]] == [0, 1, 2]
    assert all(c["images_scored"] == 2 and 0 <= c["mean_confidence"] <= 1 for c in result["checkpoints"])
    assert "order confidence" in capsys.readouterr().out
    assert main(["eval", "--learn", "--dataset", "folder", "--root", str(root), "--holdout", "4",
                 "--refine", "none", "--json", str(out)]) == 2  # nothing left to teach
