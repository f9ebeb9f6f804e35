"""Feedback on pre-annotation: brush masks compared, records stored (Redis, files), summarized, reported."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from backend.labelstudio.corrections import LabelSummary, compare, summarize
from backend.settings import Settings
from backend.storage.backing import feedback_store
from backend.storage.feedback_log import (
    FeedbackRecord,
    FeedbackStoreError,
    FileFeedbackStore,
    LabelFeedback,
    RedisFeedbackStore,
)
from backend.evaluation.report import format_table, render_chart
from tests.redis_server import RedisServer, free_port

HEIGHT, WIDTH = 30, 40
DAY = 86400.0


def square(top: int, left: int, size: int = 10) -> np.ndarray:
    """A 0/255 uint8 mask of the 40x30 image with a size x size square set."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[top:top + size, left:left + size] = 255
    return mask


def brush(label: str, mask: np.ndarray, from_name: str = "tag") -> dict:
    """A brush result shaped like backend.exports.brush_results.brush_results makes them."""
    return rle_result(label, [int(v) for v in mask2rle(mask)], mask.shape, from_name)


def rle_result(label: str, rle: list[int], shape: tuple[int, int] = (HEIGHT, WIDTH), from_name: str = "tag") -> dict:
    return {
        "id": f"{from_name}-{label}",
        "from_name": from_name,
        "to_name": "image",
        "type": "brushlabels",
        "original_width": shape[1],
        "original_height": shape[0],
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
    }


def record(project: str, task: int, timestamp: float, *labels: LabelFeedback) -> FeedbackRecord:
    return FeedbackRecord(project=project, task=task, timestamp=timestamp, model_version="m1", labels=labels)


# --- compare ------------------------------------------------------------------------------------


def test_an_unchanged_region_is_kept_with_iou_1() -> None:
    results = [brush("sky", square(0, 0))]
    assert compare(results, results) == [LabelFeedback("sky", 1.0, "kept")]


def test_a_shrunk_region_is_edited_with_its_exact_iou() -> None:
    predicted = square(5, 5)  # 100 pixels
    annotated = predicted.copy()
    annotated[14, 5:12] = 0  # 7 pixels of the bottom row erased: 93 / 100
    assert compare([brush("sky", predicted)], [brush("sky", annotated)]) == [LabelFeedback("sky", 0.93, "edited")]


def test_one_pixel_off_in_a_hundred_still_counts_as_kept() -> None:
    annotated = square(5, 5)
    annotated[5, 5] = 0  # 99 / 100: exactly the threshold
    assert compare([brush("sky", square(5, 5))], [brush("sky", annotated)]) == [LabelFeedback("sky", 0.99, "kept")]


def test_a_predicted_label_the_annotator_removed_is_deleted() -> None:
    prediction = [brush("sky", square(0, 0)), brush("car", square(15, 20))]
    annotation = [brush("sky", square(0, 0))]
    assert compare(prediction, annotation) == [LabelFeedback("car", 0.0, "deleted"), LabelFeedback("sky", 1.0, "kept")]


def test_a_label_only_the_annotator_drew_is_added() -> None:
    prediction = [brush("sky", square(0, 0))]
    annotation = [brush("sky", square(0, 0)), brush("dog", square(15, 20))]
    assert compare(prediction, annotation) == [LabelFeedback("dog", 0.0, "added"), LabelFeedback("sky", 1.0, "kept")]


def test_regions_of_one_label_are_ored_into_one_mask() -> None:
    prediction = [brush("tree", square(0, 0)), brush("tree", square(15, 25))]  # 2 x 100 pixels
    merged = np.maximum(square(0, 0), square(15, 25))
    assert compare(prediction, [brush("tree", merged)]) == [LabelFeedback("tree", 1.0, "kept")]
    assert compare(prediction, [brush("tree", square(0, 0))]) == [LabelFeedback("tree", 0.5, "edited")]
    assert compare([brush("tree", merged)], prediction) == [LabelFeedback("tree", 1.0, "kept")]


@pytest.mark.parametrize("rle", [
    pytest.param([1, 2, 3], id="garbage"),
    pytest.param([int(v) for v in mask2rle(np.zeros((20, 20), dtype=np.uint8))], id="another-size"),
    pytest.param([int(v) for v in mask2rle(square(0, 0))][:8], id="truncated"),
    pytest.param([0, 0, 18, 192, "x", "y"], id="not-bytes"),
])
def test_a_region_whose_rle_does_not_decode_to_the_image_is_skipped(rle: list[int],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    prediction = [brush("sky", square(0, 0)), rle_result("road", rle)]
    annotation = [brush("sky", square(0, 0)), brush("road", square(15, 20))]
    with caplog.at_level(logging.WARNING, logger="backend.labelstudio.corrections"):
        feedback = compare(prediction, annotation)
    assert feedback == [LabelFeedback("road", 0.0, "added"), LabelFeedback("sky", 1.0, "kept")]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "road" in caplog.records[0].getMessage()


def test_polygons_are_ignored_and_tools_are_compared_separately() -> None:
    polygon = {"from_name": "outline", "to_name": "image", "type": "polygonlabels", "original_width": WIDTH,
               "original_height": HEIGHT, "value": {"points": [[0, 0], [50, 0], [50, 50]], "polygonlabels": ["sky"]}}
    prediction = [brush("sky", square(0, 0), from_name="tag"), polygon]
    annotation = [brush("sky", square(0, 0), from_name="other")]
    assert compare(prediction, annotation) == [LabelFeedback("sky", 0.0, "added"),  # other/sky
                                               LabelFeedback("sky", 0.0, "deleted")]  # tag/sky


def test_empty_masks_kept_empty_are_kept() -> None:
    empty = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    assert compare([brush("sky", empty)], [brush("sky", empty)]) == [LabelFeedback("sky", 1.0, "kept")]


# --- records and summaries ----------------------------------------------------------------------


def test_a_record_round_trips_through_json() -> None:
    original = record("proj-1", 7, 1_700_000_000.5, LabelFeedback("sky", 0.93, "edited"),
                      LabelFeedback("car", 0.0, "deleted"))
    assert "\n" not in original.to_json()
    assert FeedbackRecord.from_json(original.to_json()) == original


@pytest.mark.parametrize("text", [
    "not json",
    "[]",
    '{"project": "p", "task": "7", "timestamp": 1.0, "model_version": "m", "labels": []}',
    ('{"project": "p", "task": 7, "timestamp": 1.0, "model_version": "m", '
     '"labels": [{"label": "sky", "iou": 0.5, "outcome": "liked"}]}'),
    ('{"project": "p", "task": 7, "timestamp": 1.0, "model_version": "m", '
     '"labels": [{"label": "sky", "iou": 1.5, "outcome": "kept"}]}'),
])
def test_from_json_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="not a feedback record"):
        FeedbackRecord.from_json(text)


def test_summarize_counts_outcomes_and_averages_iou_per_label() -> None:
    records = [
        record("p", 1, 1.0, LabelFeedback("sky", 1.0, "kept"), LabelFeedback("car", 0.5, "edited")),
        record("p", 2, 2.0, LabelFeedback("sky", 0.5, "edited"), LabelFeedback("car", 0.0, "deleted")),
        record("p", 3, 3.0, LabelFeedback("sky", 0.75, "edited"), LabelFeedback("dog", 0.0, "added")),
    ]
    summary = summarize(records)
    assert list(summary) == ["car", "dog", "sky"]
    assert summary["sky"] == LabelSummary("sky", count=3, mean_iou=0.75, kept=1, edited=2, deleted=0, added=0)
    assert summary["car"] == LabelSummary("car", count=2, mean_iou=0.25, kept=0, edited=1, deleted=1, added=0)
    assert summary["dog"] == LabelSummary("dog", count=1, mean_iou=0.0, kept=0, edited=0, deleted=0, added=1)
    assert summarize([]) == {}


# --- stores -------------------------------------------------------------------------------------


def test_the_redis_store_round_trips_records_in_order(redis_server: RedisServer) -> None:
    store = RedisFeedbackStore(redis_server.url)
    first = record("redis-proj", 1, 10.0, LabelFeedback("sky", 1.0, "kept"))
    second = record("redis-proj", 2, 20.0, LabelFeedback("sky", 0.5, "edited"), LabelFeedback("dog", 0.0, "added"))
    store.add(first)
    store.add(second)
    store.add(record("other-proj", 3, 30.0))
    assert store.records("redis-proj") == [first, second]
    assert store.records("no-such-proj") == []
    with redis_server.client() as client:
        assert client.llen("freeseg:feedback:redis-proj") == 2


def test_the_redis_store_skips_an_unreadable_entry(redis_server: RedisServer,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = RedisFeedbackStore(redis_server.url)
    good = record("torn-proj", 1, 10.0, LabelFeedback("sky", 1.0, "kept"))
    with redis_server.client() as client:
        client.rpush("freeseg:feedback:torn-proj", b"{not json", good.to_json())
    with caplog.at_level(logging.WARNING, logger="backend.storage.feedback_log"):
        assert store.records("torn-proj") == [good]
    assert "unreadable feedback entry" in caplog.text


def test_an_unreachable_redis_raises_a_feedback_store_error_without_the_password() -> None:
    store = RedisFeedbackStore(f"redis://:hunter2@127.0.0.1:{free_port()}/0", timeout_seconds=0.5)
    with pytest.raises(FeedbackStoreError, match="Redis feedback store at redis://127.0.0.1") as raised:
        store.add(record("p", 1, 1.0))
    assert "hunter2" not in str(raised.value)
    with pytest.raises(FeedbackStoreError):
        store.records("p")


def test_the_file_store_round_trips_records_in_order(tmp_path: Path) -> None:
    store = FileFeedbackStore(tmp_path / "feedback")
    first = record("file.proj_1", 1, 10.0, LabelFeedback("sky", 1.0, "kept"))
    second = record("file.proj_1", 2, 20.0, LabelFeedback("sky", 0.5, "edited"))
    assert store.records("file.proj_1") == []
    store.add(first)
    store.add(second)
    store.add(record("other", 3, 30.0))
    assert store.records("file.proj_1") == [first, second]
    assert sorted(p.name for p in (tmp_path / "feedback").iterdir()) == ["feedback-file.proj_1.jsonl",
                                                                          "feedback-other.jsonl"]


@pytest.mark.parametrize("project", ["../x", "a/b", "", "sp ace", "ünï", "x\n"])
def test_the_file_store_refuses_unsafe_project_names(tmp_path: Path, project: str) -> None:
    store = FileFeedbackStore(tmp_path / "feedback")
    with pytest.raises(ValueError, match="project name"):
        store.add(record(project, 1, 1.0))
    with pytest.raises(ValueError, match="project name"):
        store.records(project)
    assert list(tmp_path.rglob("*")) == []


def test_concurrent_appends_to_the_file_store_keep_every_line_whole(tmp_path: Path) -> None:
    store = FileFeedbackStore(tmp_path)
    labels = tuple(LabelFeedback(f"label-{i}", 0.5, "edited") for i in range(50))  # long lines

    def append(worker: int) -> None:
        for task in range(20):
            store.add(record("busy", worker * 100 + task, float(task), *labels))

    threads = [threading.Thread(target=append, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.task for r in store.records("busy")) == sorted(w * 100 + t for w in range(4) for t in range(20))


def test_the_file_store_skips_a_torn_last_line(tmp_path: Path) -> None:
    store = FileFeedbackStore(tmp_path)
    good = record("torn", 1, 1.0, LabelFeedback("sky", 1.0, "kept"))
    store.add(good)
    with store.path("torn").open("a", encoding="utf-8") as file:
        file.write(good.to_json()[:20])
    assert store.records("torn") == [good]


def test_the_feedback_store_is_redis_only_with_a_url(tmp_path: Path) -> None:
    assert isinstance(feedback_store(Settings(redis_url=None, model_dir=tmp_path)), FileFeedbackStore)
    assert isinstance(feedback_store(Settings(redis_url="", model_dir=tmp_path)), FileFeedbackStore)
    assert isinstance(feedback_store(Settings(redis_url="redis://127.0.0.1:1/0", model_dir=tmp_path)),
                      RedisFeedbackStore)


# --- report -------------------------------------------------------------------------------------


def test_format_table_lists_labels_sorted_with_their_numbers() -> None:
    summary = {
        "sky": LabelSummary("sky", count=3, mean_iou=0.75, kept=1, edited=2, deleted=0, added=0),
        "car": LabelSummary("car", count=12, mean_iou=0.25, kept=0, edited=1, deleted=10, added=1),
    }
    lines = format_table(summary).splitlines()
    assert lines[0].split() == ["label", "n", "mean", "IoU", "kept", "edited", "deleted", "added"]
    assert lines[2].split() == ["car", "12", "0.250", "0", "1", "10", "1"]
    assert lines[3].split() == ["sky", "3", "0.750", "1", "2", "0", "0"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up


@pytest.mark.parametrize("count", [1, 10])
def test_render_chart_writes_a_png(tmp_path: Path, count: int) -> None:
    records = [record("p", task, 1_700_000_000 + task * DAY, LabelFeedback("sky", task / 10, "edited"),
                      LabelFeedback("car", 1.0, "kept")) for task in range(count)]
    path = render_chart(records, tmp_path / "chart.png")
    assert path == tmp_path / "chart.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 300


def test_render_chart_refuses_no_records(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no label feedback"):
        render_chart([], tmp_path / "chart.png")


def test_format_over_time_gives_each_label_its_mean_iou_per_group_of_annotations() -> None:
    from backend.evaluation.report import format_over_time

    # Given out of time order: the table orders them. sky improves; car only in the last group.
    records = [record("p", task, 1_700_000_000 + task * DAY, LabelFeedback("sky", task / 10, "edited"),
                      *([LabelFeedback("car", 1.0, "kept")] if task >= 8 else [])) for task in reversed(range(10))]
    lines = format_over_time(records, periods=5, taught={"sky": 3, "tree": 1}).splitlines()
    assert lines[0].split() == ["label", "taught", "1-2", "3-4", "5-6", "7-8", "9-10"]
    assert lines[2].split() == ["car", "no", "-", "-", "-", "-", "1.000"]
    assert lines[3].split() == ["sky", "3", "regions", "0.050", "0.250", "0.450", "0.650", "0.850"]
    assert lines[4].split() == ["tree", "1", "regions", "-", "-", "-", "-", "-"]  # taught, never corrected
    assert format_over_time(records[:2], periods=5).splitlines()[0].split() == ["label", "taught", "1-1", "2-2"]
    assert format_over_time(records[:2], periods=5).splitlines()[2].split()[1] == "?"  # memory unknown
