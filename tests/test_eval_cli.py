"""``freesegdiff eval``, on a tiny synthetic VOC-layout folder: with predictions, and with the tiny models."""

import json

import numpy as np
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
