"""annotate_folder: a folder of images to tasks.json, coco.json and label-index PNGs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import redis
import sklearn
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend.jobs.folder import (
    FolderRun,
    FolderSummary,
    annotate_folder,
    local_files_reference,
    url_prefix_reference,
)
from backend.exports.coco import coco_rle
from backend.storage.cached_encoder import one_pass_cache
from backend.options import SegmentOptions
from backend.pipeline.vocabulary import Label

SAMPLES = Path(sklearn.__file__).parent / "datasets" / "images"
LABELS = [Label("building"), Label("flower"), Label("sky")]
OPTIONS = SegmentOptions(k=3, refine="none", use_caption=False)  # every label a candidate: regions to check
VERSION = "test-version"
PREFIX = "https://bucket.example/images/"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/photos/{china.jpg, flowers/my flower.jpg, broken.png}: a space in a name, a subfolder, a corrupt file."""
    root = tmp_path_factory.mktemp("root")
    folder = root / "photos"
    (folder / "flowers").mkdir(parents=True)
    shutil.copy(SAMPLES / "china.jpg", folder / "china.jpg")
    shutil.copy(SAMPLES / "flower.jpg", folder / "flowers" / "my flower.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def run(folder: Path, out: Path, segmenter, reference) -> FolderSummary:
    return annotate_folder(FolderRun(folder, out, tuple(LABELS), OPTIONS), segmenter, VERSION, reference, batch=2,
                           progress=False)


@pytest.fixture(scope="module")
def url_run(dataset: Path, tiny_segmenter, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FolderSummary]:
    out = tmp_path_factory.mktemp("out-url")
    return out, run(dataset, out, tiny_segmenter, url_prefix_reference(PREFIX, dataset))


def test_outputs_and_failures(url_run: tuple[Path, FolderSummary]) -> None:
    out, summary = url_run
    assert summary.done == 2 and summary.seconds > 0
    assert [path for path, _ in summary.failed] == ["broken.png"]
    reason = summary.failed[0][1]
    assert reason and "\n" not in reason
    assert (out / "tasks.json").is_file() and (out / "coco.json").is_file()
    masks = sorted(p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*") if p.is_file())
    assert masks == ["china.png", "flowers/my flower.png"]
    assert not list(out.glob(".*.tmp"))
    coco = json.loads((out / "coco.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == ["china.jpg", "flowers/my flower.jpg"]
    assert all("broken" not in json.dumps(task) for task in json.loads((out / "tasks.json").read_text()))


def test_tasks_with_url_prefix(url_run: tuple[Path, FolderSummary]) -> None:
    out, _ = url_run
    tasks = json.loads((out / "tasks.json").read_text())
    assert [task["data"] for task in tasks] == [
        {"image": "https://bucket.example/images/china.jpg"},
        {"image": "https://bucket.example/images/flowers/my%20flower.jpg"},
    ]
    sizes = [(427, 640), (427, 640)]
    for task, (height, width) in zip(tasks, sizes):
        (record,) = task["predictions"]
        assert record["model_version"] == VERSION
        for result in record["result"]:
            assert (result["from_name"], result["to_name"], result["type"]) == ("label", "image", "brushlabels")
            assert (result["original_height"], result["original_width"]) == (height, width)
            pixels = decode_rle(result["value"]["rle"])
            assert pixels.size == height * width * 4
    assert any(task["predictions"][0]["result"] for task in tasks)


def test_tasks_with_local_files(dataset: Path, tiny_segmenter, tmp_path: Path) -> None:
    summary = run(dataset, tmp_path / "out", tiny_segmenter, local_files_reference(dataset.parent))
    assert summary.done == 2
    tasks = json.loads((tmp_path / "out" / "tasks.json").read_text())
    assert [task["data"]["image"] for task in tasks] == [
        "/data/local-files/?d=photos/china.jpg",
        "/data/local-files/?d=photos/flowers/my%20flower.jpg",
    ]


def decode_coco_rle(rle: dict) -> np.ndarray:
    """An independent decoder: alternate runs of 0 and 1, laid out column-major."""
    height, width = rle["size"]
    values = np.concatenate([np.full(count, index % 2, dtype=bool) for index, count in enumerate(rle["counts"])])
    assert values.size == height * width
    return values.reshape((height, width), order="F")


def test_coco_masks_match_label_pngs(url_run: tuple[Path, FolderSummary]) -> None:
    out, _ = url_run
    coco = json.loads((out / "coco.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "building"}, {"id": 2, "name": "flower"}, {"id": 3, "name": "sky"}]
    assert [image["id"] for image in coco["images"]] == [1, 2]
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    assert coco["annotations"], "no labelled region at all: nothing checked"
    for image in coco["images"]:
        label_map = np.asarray(Image.open((out / "masks" / image["file_name"]).with_suffix(".png")))
        assert label_map.shape == (image["height"], image["width"])
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert sorted(a["category_id"] for a in annotations) == sorted(int(v) for v in np.unique(label_map) if v)
        for annotation in annotations:
            mask = decode_coco_rle(annotation["segmentation"])
            expected = label_map == annotation["category_id"]
            assert np.array_equal(mask, expected)
            assert annotation["area"] == int(expected.sum())
            x, y, w, h = annotation["bbox"]
            ys, xs = np.nonzero(expected)
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert annotation["iscrowd"] == 0 and 0 <= annotation["score"] <= 1


def test_coco_rle_edge_cases() -> None:
    assert coco_rle(np.array([[1, 1], [0, 1]], dtype=bool)) == {"counts": [0, 1, 1, 2], "size": [2, 2]}
    assert coco_rle(np.zeros((2, 3), dtype=bool)) == {"counts": [6], "size": [2, 3]}
    assert coco_rle(np.ones((1, 3), dtype=bool)) == {"counts": [0, 3], "size": [1, 3]}


def test_same_folder_twice_same_files(dataset: Path, tiny_segmenter, url_run, tmp_path: Path) -> None:
    first, _ = url_run
    run(dataset, tmp_path, tiny_segmenter, url_prefix_reference(PREFIX, dataset))
    for name in ("tasks.json", "coco.json"):
        assert (tmp_path / name).read_bytes() == (first / name).read_bytes()


def test_a_second_run_with_redis_reads_the_encodings_from_the_feature_cache(
    dataset: Path, tiny_segmenter, tiny_settings, redis_server, url_run, tmp_path: Path, monkeypatch,
) -> None:
    redis.Redis.from_url(redis_server.url).flushdb()  # earlier tests' runs on this server may have cached these photos
    cache = one_pass_cache(tiny_settings.model_copy(update={"redis_url": redis_server.url}))
    encoded: list[int] = []
    encode_many = tiny_segmenter.encode_many

    def counting(images, max_batch):
        encoded.append(len(images))
        return encode_many(images, max_batch)

    monkeypatch.setattr(tiny_segmenter, "encode_many", counting)
    runs = [tmp_path / "first", tmp_path / "second"]
    for out in runs:
        annotate_folder(FolderRun(dataset, out, tuple(LABELS), OPTIONS), tiny_segmenter, VERSION,
                        url_prefix_reference(PREFIX, dataset), batch=2, progress=False, cache=cache)
        assert sum(encoded) == 2  # the two readable images, encoded by the first run only
    first, second = ((out / "tasks.json").read_text() for out in runs)
    assert second == first == (url_run[0] / "tasks.json").read_text()


def test_local_files_reference_refuses_outside_root(dataset: Path, tiny_segmenter, tmp_path: Path) -> None:
    reference = local_files_reference(dataset / "flowers")
    assert reference(dataset / "flowers" / "my flower.jpg") == "/data/local-files/?d=my%20flower.jpg"
    with pytest.raises(ValueError, match="outside"):
        reference(dataset / "china.jpg")
    with pytest.raises(ValueError, match="outside"):
        run(dataset, tmp_path / "out", tiny_segmenter, reference)
    assert not (tmp_path / "out").exists()


def test_output_inside_the_folder_is_not_read_back(tiny_segmenter, tmp_path: Path) -> None:
    shutil.copy(SAMPLES / "china.jpg", tmp_path / "china.jpg")
    for _ in range(2):
        summary = run(tmp_path, tmp_path / "out", tiny_segmenter, url_prefix_reference(PREFIX, tmp_path))
        assert (summary.done, summary.failed) == (1, [])


def test_annotate_folder_command(tmp_path, tiny_settings, monkeypatch, capsys):
    from backend.cli import main
    from backend.settings import get_settings

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg", folder / "china.jpg")
    monkeypatch.setenv("FREESEG_MODELS", "tiny")
    monkeypatch.setenv("FREESEG_DEVICE", "cpu")
    monkeypatch.setenv("MODEL_DIR", str(tiny_settings.model_dir))
    get_settings.cache_clear()
    try:
        code = main(["annotate-folder", str(folder), "--labels", "building,tree,sky", "--out", str(tmp_path / "out"),
                     "--image-root-url", "https://images.example/", "--no-caption", "--refine", "none"])
    finally:
        get_settings.cache_clear()
    assert code == 0 and "1 images annotated, 0 failed" in capsys.readouterr().out
    tasks = json.loads((tmp_path / "out" / "tasks.json").read_text())
    assert tasks[0]["data"]["image"] == "https://images.example/china.jpg" and tasks[0]["predictions"][0]["result"]


def test_a_folder_of_unreadable_images_reports_every_one(tmp_path: Path, tiny_segmenter) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):  # no batch has an image to segment
        (folder / name).write_bytes(b"not an image")
    summary = run(folder, tmp_path / "out", tiny_segmenter, url_prefix_reference(PREFIX, folder))
    assert summary.done == 0
    assert [path for path, _ in summary.failed] == ["a.png", "b.png", "c.png"]
    assert json.loads((tmp_path / "out" / "tasks.json").read_text()) == []
