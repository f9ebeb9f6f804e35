"""The evaluation harness on synthetic 4x4 maps whose TP/FP/FN can be counted by eye.

Expected values are written as fractions counted from the maps in each test, never computed
with the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.evaluation.datasets import COCO_OBJECT_NAMES, VOC_NAMES, get_dataset
from backend.evaluation.scores import ConfusionMatrix, ReleasePerImageMean
from backend.evaluation.run import evaluate_predictions, evaluate_with_model, write_json

X = 255  # ignored


def _map(rows: list[list[int]]) -> np.ndarray:
    return np.array(rows, dtype=np.uint8)


def test_ignored_pixels_and_a_class_nobody_uses():
    truth = _map([[0, 0, 1, 1],
                  [0, 0, 1, 1],
                  [0, 0, 1, 1],
                  [X, X, X, X]])
    prediction = _map([[0, 0, 0, 1],
                       [0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [1, 1, 1, 1]])  # the last row lies on ignored pixels: no FP of class 1
    matrix = ConfusionMatrix(3)
    matrix.update(prediction, truth)
    # class 0: TP 6, FP 1, FN 0; class 1: TP 5, FP 0, FN 1; class 2: never present, never predicted.
    assert matrix.iou_per_class() == pytest.approx([100 * 6 / 7, 100 * 5 / 6, None])
    assert matrix.iou_per_class()[2] is None
    assert matrix.miou() == pytest.approx(100 * (6 / 7 + 5 / 6) / 2)
    assert matrix.pixel_accuracy() == pytest.approx(100 * 11 / 12)
    assert matrix.miou_per_image_mean() == pytest.approx(matrix.miou())


def test_a_class_in_the_truth_never_predicted_counts_as_zero():
    truth = _map([[0, 0, 0, 0],
                  [0, 0, 0, 0],
                  [2, 2, 0, 0],
                  [2, 2, 0, 0]])
    matrix = ConfusionMatrix(3)
    matrix.update(np.zeros((4, 4), dtype=np.uint8), truth)
    # class 0: TP 12, FP 4; class 2: FN 4, TP 0; class 1 absent from both.
    assert matrix.iou_per_class() == pytest.approx([75.0, None, 0.0])
    assert matrix.miou() == pytest.approx((75.0 + 0.0) / 2)
    assert matrix.pixel_accuracy() == pytest.approx(75.0)


def test_a_predicted_class_absent_from_the_truth_counts_as_zero():
    prediction = _map([[0, 0, 0, 0],
                       [0, 1, 1, 0],
                       [0, 1, 1, 0],
                       [0, 0, 0, 0]])
    matrix = ConfusionMatrix(3)
    matrix.update(prediction, np.zeros((4, 4), dtype=np.uint8))
    # class 0: TP 12, FN 4; class 1: FP 4, TP 0.
    assert matrix.iou_per_class() == pytest.approx([75.0, 0.0, None])
    assert matrix.miou() == pytest.approx(37.5)


def test_dataset_level_and_per_image_means_differ():
    matrix = ConfusionMatrix(2)
    matrix.update(np.zeros((4, 4), dtype=np.uint8), np.zeros((4, 4), dtype=np.uint8))
    half = _map([[1, 1, 0, 0]] * 4)
    matrix.update(np.ones((4, 4), dtype=np.uint8), half)
    # image 1: class 0 IoU 1 (class 1 absent) -> 100. image 2: class 0 TP 0 FN 8 -> 0;
    # class 1 TP 8 FP 8 -> 1/2 -> image mIoU 25. Per-image mean (100 + 25) / 2 = 62.5.
    # Pooled: class 0 TP 16 FN 8 -> 2/3; class 1 TP 8 FP 8 -> 1/2; mIoU (2/3 + 1/2) / 2 = 7/12.
    assert matrix.miou_per_image_mean() == pytest.approx(62.5)
    assert matrix.miou() == pytest.approx(100 * 7 / 12)
    assert matrix.pixel_accuracy() == pytest.approx(100 * 24 / 32)
    assert matrix.num_images == 2


def test_the_authors_per_image_mean_counts_only_the_truths_classes_and_voc_void_as_background():
    truth = _map([[X, X, X, X], [0, 0, 1, 1]])
    prediction = _map([[0, 0, 0, 0], [0, 1, 1, 2]])  # class 2 is only predicted
    voc, coco, ours = ReleasePerImageMean(3, void_as_background=True), ReleasePerImageMean(3), ConfusionMatrix(3)
    for scores in (voc, coco, ours):
        scores.update(prediction, truth)
    # void as background: class 0 TP 5 of truth 6, predicted 5 -> 5/6; class 1 TP 1, truth 2, predicted 2 -> 1/3;
    # class 2 is not in the truth, so not in the mean: (5/6 + 1/3) / 2 = 7/12
    assert voc.value() == pytest.approx(100 * 7 / 12)
    # void ignored: class 0 TP 1, truth 2, predicted 1 -> 1/2; class 1 1/3: 5/12
    assert coco.value() == pytest.approx(100 * 5 / 12)
    # ours counts the predicted-only class 2 at 0: (1/2 + 1/3 + 0) / 3
    assert ours.miou_per_image_mean() == pytest.approx(100 * 5 / 18)
    voc.update(np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8))  # a perfect image: 100
    assert voc.value() == pytest.approx((100 * 7 / 12 + 100) / 2)


def test_a_wholly_ignored_image_changes_nothing():
    matrix = ConfusionMatrix(2)
    matrix.update(_map([[0, 1], [1, 1]]), _map([[0, 0], [1, 1]]))
    before = (matrix.miou(), matrix.miou_per_image_mean(), matrix.pixel_accuracy())
    matrix.update(np.ones((3, 3), dtype=np.uint8), np.full((3, 3), X, dtype=np.uint8))
    assert (matrix.miou(), matrix.miou_per_image_mean(), matrix.pixel_accuracy()) == before


def test_a_prediction_of_another_size_is_refused():
    matrix = ConfusionMatrix(2)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 4\)"):
        matrix.update(np.zeros((4, 5), dtype=np.uint8), np.zeros((4, 4), dtype=np.uint8))


@pytest.mark.parametrize("bad", [3, 7])
def test_a_prediction_outside_the_classes_is_refused(bad):
    prediction = np.zeros((4, 4), dtype=np.uint8)
    prediction[0, 0] = bad
    with pytest.raises(ValueError, match=f"label {bad}"):
        ConfusionMatrix(3).update(prediction, np.zeros((4, 4), dtype=np.uint8))


def test_truth_outside_the_classes_and_non_integer_maps_are_refused():
    truth = np.zeros((2, 2), dtype=np.uint8)
    truth[1, 1] = 5
    with pytest.raises(ValueError, match="ground truth"):
        ConfusionMatrix(3).update(np.zeros((2, 2), dtype=np.uint8), truth)
    with pytest.raises(ValueError, match="integer"):
        ConfusionMatrix(3).update(np.zeros((2, 2)), np.zeros((2, 2), dtype=np.uint8))


def test_no_pixels_no_score():
    with pytest.raises(ValueError, match="nothing to score"):
        ConfusionMatrix(2).miou()


# --- dataset folders ---------------------------------------------------------------------------

VOC_A, VOC_B = "2007_000032", "2007_000039"
VOC_TRUTH = {
    VOC_A: _map([[0, 0, 0, 0],
                 [0, 15, 15, 0],
                 [0, 15, 15, X],
                 [0, 0, X, X]]),
    VOC_B: _map([[12, 12, 12, 12],
                 [12, 12, 12, 12],
                 [0, 0, 0, 0],
                 [0, 0, 0, 0]]),
}
VOC_PREDICTION = {
    VOC_A: _map([[0, 0, 0, 0],
                 [0, 15, 15, 15],
                 [0, 15, 0, 7],
                 [0, 0, 7, 7]]),  # the 7s lie on void pixels only
    VOC_B: np.zeros((4, 4), dtype=np.uint8),
}


def _palette_png(labels: np.ndarray, path: Path) -> None:
    """A VOC-style PNG: mode P, colours unrelated to the indices, so reading colours would fail."""
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    image.putpalette([channel for index in range(256) for channel in ((index * 37) % 256, 255 - index, index)])
    image.save(path)


def _jpeg(path: Path, shape: tuple[int, int]) -> None:
    Image.fromarray(np.full((*shape, 3), 128, dtype=np.uint8)).save(path)


def _write_predictions(folder: Path, maps: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, labels in maps.items():
        Image.fromarray(labels).save(folder / f"{image_id}.png")
    return folder


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text(f"{VOC_A}\n{VOC_B}\n")
    for image_id, labels in VOC_TRUTH.items():
        _jpeg(root / "JPEGImages" / f"{image_id}.jpg", labels.shape)
        _palette_png(labels, root / "SegmentationClass" / f"{image_id}.png")
    return root


def test_voc_reader_gives_palette_indices(voc_root):
    samples = list(get_dataset("voc").samples(voc_root))
    assert [sample.image_id for sample in samples] == [VOC_A, VOC_B]
    assert Image.open(voc_root / "SegmentationClass" / f"{VOC_A}.png").mode == "P"
    for sample in samples:
        np.testing.assert_array_equal(sample.label, VOC_TRUTH[sample.image_id])
        assert sample.image_path == voc_root / "JPEGImages" / f"{sample.image_id}.jpg"


def test_voc_classes_keep_voc_names_and_readable_prompts():
    voc = get_dataset("voc")
    assert voc.num_classes == 21 and len(VOC_NAMES) == 21
    assert voc.class_names[0] == "background" and voc.class_names[15] == "person"
    assert voc.class_names[11] == "diningtable" and voc.classes[11].prompt_name == "dining table"
    assert voc.classes[16].prompt_name == "potted plant" and voc.classes[20].prompt_name == "tv monitor"
    assert voc.label_names[0] == "aeroplane" and len(voc.label_names) == 20


def test_voc_folder_scored_from_prediction_pngs(voc_root, tmp_path):
    predictions = _write_predictions(tmp_path / "pred", VOC_PREDICTION)
    result = evaluate_predictions("voc", voc_root, predictions, None)
    # Image A (13 scored pixels): background TP 8 FP 1 FN 1; person TP 3 FP 1 FN 1.
    # Image B (16): background TP 8 FP 8; dog FN 8.
    # Pooled: background 16 / (16 + 9 + 1); person 3 / 5; dog 0; "car" (7) only on void: no IoU.
    iou = result["per_class_iou"]
    assert iou["background"] == pytest.approx(100 * 16 / 26)
    assert iou["person"] == pytest.approx(60.0)
    assert iou["dog"] == 0.0
    assert iou["car"] is None and iou["aeroplane"] is None
    assert len(iou) == 21
    assert result["miou"] == pytest.approx(100 * (16 / 26 + 3 / 5 + 0) / 3)
    assert result["pixel_accuracy"] == pytest.approx(100 * 19 / 29)
    # per image: A (8/10 + 3/5) / 2 = 0.7; B (8/16 + 0) / 2 = 0.25.
    assert result["miou_per_image_mean"] == pytest.approx(100 * (0.7 + 0.25) / 2)
    assert (result["dataset"], result["num_images"], result["num_classes"]) == ("voc", 2, 21)


def test_limit_scores_only_the_first_images(voc_root, tmp_path):
    predictions = _write_predictions(tmp_path / "pred", {VOC_A: VOC_PREDICTION[VOC_A]})  # B's is never needed
    result = evaluate_predictions("voc", voc_root, predictions, 1)
    assert result["num_images"] == 1
    assert result["miou"] == pytest.approx(100 * (8 / 10 + 3 / 5) / 2)
    assert len(list(get_dataset("voc").samples(voc_root, limit=0))) == 0
    with pytest.raises(ValueError, match="limit"):
        get_dataset("voc").samples(voc_root, limit=-1)


def test_a_missing_prediction_names_the_image(voc_root, tmp_path):
    predictions = _write_predictions(tmp_path / "pred", {VOC_A: VOC_PREDICTION[VOC_A]})
    with pytest.raises(FileNotFoundError, match=VOC_B):
        evaluate_predictions("voc", voc_root, predictions, None)


def test_a_prediction_of_the_wrong_size_names_the_image(voc_root, tmp_path):
    predictions = _write_predictions(
        tmp_path / "pred", {VOC_A: VOC_PREDICTION[VOC_A], VOC_B: np.zeros((8, 8), dtype=np.uint8)}
    )
    with pytest.raises(ValueError, match=rf"{VOC_B}.*\(8, 8\).*\(4, 4\)"):
        evaluate_predictions("voc", voc_root, predictions, None)


def test_evaluate_with_model_passes_images_and_label_names(voc_root):
    calls = []

    def segment(image: np.ndarray, labels: list[str]) -> np.ndarray:
        calls.append((image.shape, labels))
        return np.zeros(image.shape[:2], dtype=np.uint16)

    result = evaluate_with_model("voc", voc_root, None, segment)
    assert [shape for shape, _ in calls] == [(4, 4, 3), (4, 4, 3)]
    assert calls[0][1] == get_dataset("voc").label_names and "dining table" in calls[0][1]
    # All background: A background TP 9 FP 4 (person); B background TP 8 FP 8 (dog).
    # Pooled background 17 / 29; person 0; dog 0.
    assert result["miou"] == pytest.approx(100 * (17 / 29) / 3)
    assert result["num_images"] == 2


COCO_ID = "000000000139"
# person (1), car (3), cat (16), toothbrush (80), background (0) and ignored pixels.
COCO_TRUTH = _map([[1, 1, 3, 3],
                   [1, 1, 3, 3],
                   [16, 16, 0, 80],
                   [16, X, 0, 80]])


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    _jpeg(root / "images" / f"{COCO_ID}.jpg", COCO_TRUTH.shape)
    Image.fromarray(COCO_TRUTH).save(root / "annotations" / f"{COCO_ID}.png")
    return root


def test_coco_object_names_follow_coco_category_order():
    # COCO's category ids 1..90 with the 10 unused ids dropped, written out flat here.
    expected = (
        "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
        "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
        "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
        "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
        "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
        "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
        "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
        "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
        "teddy bear", "hair drier", "toothbrush",
    )
    assert len(expected) == 80
    assert COCO_OBJECT_NAMES == ("background", *expected)
    assert get_dataset("coco-object").class_names == list(COCO_OBJECT_NAMES)


def test_coco_object_folder_scored_from_prediction_pngs(coco_root, tmp_path):
    prediction = _map([[1, 1, 3, 3],
                       [1, 1, 1, 3],
                       [17, 17, 0, 0],
                       [16, 16, 0, 80]])
    predictions = _write_predictions(tmp_path / "pred", {COCO_ID: prediction})
    result = evaluate_predictions("coco-object", coco_root, predictions, None)
    # 15 scored pixels. person TP 4 FP 1; car TP 3 FN 1; cat TP 1 FN 2 (one cat pixel is ignored);
    # dog (17) FP 2; background TP 2 FP 1 (a toothbrush pixel); toothbrush TP 1 FN 1.
    iou = result["per_class_iou"]
    expected = {"person": 4 / 5, "car": 3 / 4, "cat": 1 / 3, "dog": 0.0, "background": 2 / 3, "toothbrush": 1 / 2}
    for name, value in expected.items():
        assert iou[name] == pytest.approx(100 * value)
    assert sum(value is not None for value in iou.values()) == 6
    assert result["miou"] == pytest.approx(100 * sum(expected.values()) / 6)
    assert result["pixel_accuracy"] == pytest.approx(100 * 11 / 15)
    assert (result["num_classes"], result["num_images"]) == (81, 1)


def test_coco27_maps_things_to_their_supercategory(coco_root, tmp_path):
    coco27 = get_dataset("coco27")
    assert coco27.class_names == ["background", "person", "vehicle", "outdoor", "animal", "accessory", "sports",
                                  "kitchen", "food", "furniture", "electronic", "appliance", "indoor"]
    (sample,) = coco27.samples(coco_root)
    # person -> person (1), car -> vehicle (2), cat -> animal (4), toothbrush -> indoor (12).
    np.testing.assert_array_equal(sample.label, _map([[1, 1, 2, 2],
                                                      [1, 1, 2, 2],
                                                      [4, 4, 0, 12],
                                                      [4, X, 0, 12]]))
    prediction = _map([[1, 1, 2, 2],
                       [1, 1, 2, 2],
                       [4, 4, 0, 12],
                       [4, 4, 0, 0]])
    result = evaluate_predictions("coco27", coco_root, _write_predictions(tmp_path / "pred", {COCO_ID: prediction}),
                                  None)
    # background TP 2 FP 1; indoor TP 1 FN 1; the rest exact.
    assert result["per_class_iou"]["background"] == pytest.approx(100 * 2 / 3)
    assert result["per_class_iou"]["indoor"] == pytest.approx(50.0)
    assert result["miou"] == pytest.approx(100 * (2 / 3 + 1 + 1 + 1 + 1 / 2) / 5)
    assert result["num_classes"] == 13


def test_coco_label_outside_the_80_classes_is_refused(coco_root):
    Image.fromarray(_map([[0, 81], [0, 0]])).save(coco_root / "annotations" / f"{COCO_ID}.png")
    with pytest.raises(ValueError, match="label 81"):
        list(get_dataset("coco-object").samples(coco_root))


def test_unknown_dataset_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="voc, coco-object, coco27"):
        evaluate_predictions("ade20k", tmp_path, tmp_path, None)


def test_write_json_writes_nulls_not_nan(voc_root, tmp_path):
    result = evaluate_predictions("voc", voc_root, _write_predictions(tmp_path / "pred", VOC_PREDICTION), None)
    write_json(result, tmp_path / "out" / "voc.json")
    loaded = json.loads((tmp_path / "out" / "voc.json").read_text())
    assert loaded == result
    assert loaded["per_class_iou"]["car"] is None
