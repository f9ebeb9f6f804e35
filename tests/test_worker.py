"""The inference worker's mechanics: bounded queue, errors, dynamic batching of encodes."""

import threading
import time

import logging

import numpy as np
import pytest
import torch

from backend.pipeline.segmenter import Segmenter
from backend.server.inference import InferenceWorker, ModelsNotReadyError, Priority, QueueFullError


class RecordingSegmenter:
    """Records the batch sizes it is asked to encode; the batching itself is the real Segmenter's."""

    fingerprint = "fake"
    encode_many = Segmenter.encode_many

    def __init__(self):
        self.batches: list[int] = []

    def encode_batch(self, images):
        self.batches.append(len(images))
        return [f"encoding of {int(image[0, 0, 0])}" for image in images]


def image(value: int) -> np.ndarray:
    return np.full((2, 2, 3), value, dtype=np.uint8)


def ready_worker(segmenter, **kwargs) -> InferenceWorker:
    worker = InferenceWorker(lambda: segmenter, capacity=kwargs.pop("capacity", 16), **kwargs)
    worker.start()
    deadline = time.monotonic() + 5
    while worker.state != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return worker


def test_concurrent_encodes_share_one_batch_and_get_their_own_results():
    segmenter = RecordingSegmenter()
    worker = ready_worker(segmenter, max_batch=8, max_wait_seconds=0.5)
    gate, started = threading.Event(), threading.Event()
    busy = worker.submit(lambda s: (started.set(), gate.wait(5)))
    assert started.wait(5)
    futures = [worker.submit_encode([image(1), image(2)]), worker.submit_encode([image(3)]),
               worker.submit_encode([image(4), image(5), image(6)])]
    gate.set()
    busy.result(5)
    assert [f.result(5) for f in futures] == [
        ["encoding of 1", "encoding of 2"], ["encoding of 3"], ["encoding of 4", "encoding of 5", "encoding of 6"]
    ]
    assert segmenter.batches == [6]
    assert worker.depth == 0
    worker.stop()


def test_batches_never_exceed_max_batch():
    segmenter = RecordingSegmenter()
    worker = ready_worker(segmenter, max_batch=4, max_wait_seconds=0.01)
    result = worker.submit_encode([image(i) for i in range(10)]).result(5)
    assert len(result) == 10 and segmenter.batches == [4, 4, 2]
    worker.stop()


def test_an_error_reaches_every_request_of_the_batch_and_the_worker_goes_on():
    class Failing(RecordingSegmenter):
        def encode_batch(self, images):
            raise RuntimeError("CUDA out of memory")

    worker = ready_worker(Failing(), max_wait_seconds=0.01)
    with pytest.raises(RuntimeError, match="out of memory"):
        worker.submit_encode([image(1)]).result(5)
    assert worker.submit(lambda s: "still serving").result(5) == "still serving"
    worker.stop()


def test_out_of_gpu_memory_retries_at_smaller_batches_and_loses_nothing(caplog: pytest.LogCaptureFixture):
    class SmallGpu(RecordingSegmenter):
        """Runs out of memory (as torch does on CUDA) on batches of more than two images."""

        def encode_batch(self, images):
            if len(images) > 2:
                self.batches.append(-len(images))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().encode_batch(images)

    segmenter = SmallGpu()
    worker = ready_worker(segmenter, max_batch=8, max_wait_seconds=0.01)
    with caplog.at_level(logging.WARNING, logger="backend.pipeline.segmenter"):
        result = worker.submit_encode([image(i) for i in range(7)]).result(5)
    assert result == [f"encoding of {i}" for i in range(7)]
    assert segmenter.batches == [-7, -4, 2, 2, 2, 1]  # 8 -> 4 -> 2 images at a time, each image once
    assert "out of GPU memory encoding 7 images at once; retrying 4 at a time" in caplog.text
    worker.stop()


def test_out_of_memory_on_a_single_image_is_an_error_for_its_request():
    class NoGpu(RecordingSegmenter):
        def encode_batch(self, images):
            raise torch.OutOfMemoryError("CUDA out of memory")

    worker = ready_worker(NoGpu(), max_batch=4, max_wait_seconds=0.01)
    with pytest.raises(torch.OutOfMemoryError):
        worker.submit_encode([image(1), image(2)]).result(5)
    assert worker.submit(lambda s: "still serving").result(5) == "still serving"
    worker.stop()


def test_not_ready_and_full_are_refused_at_once():
    release = threading.Event()
    loading = InferenceWorker(lambda: (release.wait(5), RecordingSegmenter())[1], capacity=1)
    loading.start()
    with pytest.raises(ModelsNotReadyError, match="loading"):
        loading.submit(lambda s: None)
    release.set()
    worker = ready_worker(RecordingSegmenter(), capacity=1)
    gate, started = threading.Event(), threading.Event()
    worker.submit(lambda s: (started.set(), gate.wait(5)))
    assert started.wait(5)
    worker.submit(lambda s: None)
    with pytest.raises(QueueFullError):
        worker.ensure_accepting()  # what /predict asks before downloading anything
    with pytest.raises(QueueFullError):
        worker.submit(lambda s: None)
    gate.set()
    worker.stop()
    loading.stop()


def test_stop_cancels_the_queued_jobs_and_lets_the_running_one_finish():
    worker = ready_worker(RecordingSegmenter())
    gate, started = threading.Event(), threading.Event()
    running = worker.submit(lambda s: (started.set(), gate.wait(5), "finished")[-1])
    assert started.wait(5)
    queued = worker.submit(lambda s: "ran")
    stopping = threading.Thread(target=worker.stop)
    stopping.start()
    deadline = time.monotonic() + 5
    while not queued.cancelled():  # at shutdown, before the running job is done
        assert time.monotonic() < deadline, "the queued job was not cancelled"
        time.sleep(0.01)
    gate.set()
    stopping.join(10)
    assert running.result(5) == "finished" and worker.depth == 0


def test_an_annotators_job_runs_before_queued_background_work_and_each_priority_keeps_its_order():
    worker = ready_worker(RecordingSegmenter(), max_wait_seconds=0.0)
    gate, started, ran = threading.Event(), threading.Event(), []
    busy = worker.submit(lambda s: (started.set(), gate.wait(5)), Priority.BACKGROUND)
    assert started.wait(5)
    queued = [worker.submit(lambda s, name=name: ran.append(name), priority) for name, priority in
              [("background 1", Priority.BACKGROUND), ("background 2", Priority.BACKGROUND),
               ("many tasks", Priority.MULTI), ("one task", Priority.INTERACTIVE),
               ("another task", Priority.INTERACTIVE)]]
    gate.set()
    busy.result(5)
    for future in queued:
        future.result(5)
    assert ran == ["one task", "another task", "many tasks", "background 1", "background 2"]
    assert worker.depth == 0
    worker.stop()
