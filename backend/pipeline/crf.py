"""Dense CRFs of an image's masks, and the child processes that run them side by side.

The CRF's pairwise terms depend on the image only, so the masks of one image share
them: the lattices are built once and each mask then sets its own unary and runs the
mean-field iterations. The result is exactly that of a fresh CRF per mask.

pydensecrf holds the GIL while it runs, so CRFs run in parallel only in separate
processes. Each is ``python -m backend.pipeline.crf``: it imports this module alone
(no torch, no models), reads a request from its stdin and writes the answer to its
stdout. A request is a JSON line ``{"height": H, "width": W, "masks": R}`` followed by
the image's H*W*3 bytes (RGB) and the R masks' R*H*W bytes (0 or 1); the answer is the
refined masks' R*H*W bytes. Only raw arrays and JSON cross the pipe: no pickle.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels

log = logging.getLogger(__name__)

# CRF parameters, from the authors' released code.
CRF_GT_PROB = 0.9  # confidence of the hard mask in the unary term
CRF_GAUSSIAN_SXY = 20  # smoothness kernel, spatial standard deviation (pixels)
CRF_GAUSSIAN_COMPAT = 5  # smoothness kernel, Potts weight
CRF_BILATERAL_SXY = 20  # appearance kernel, spatial standard deviation (pixels)
CRF_BILATERAL_SRGB = 20  # appearance kernel, colour standard deviation (0-255 units)
CRF_BILATERAL_COMPAT = 100  # appearance kernel, Potts weight
CRF_ITERATIONS = 10  # mean-field iterations


def crf_refine(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """A binary dense CRF (labels: 0 outside, 1 inside) for each of ``masks`` (R, H, W), started from it."""
    height, width = masks.shape[1:]
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.addPairwiseGaussian(sxy=CRF_GAUSSIAN_SXY, compat=CRF_GAUSSIAN_COMPAT)
    crf.addPairwiseBilateral(
        sxy=CRF_BILATERAL_SXY,
        srgb=CRF_BILATERAL_SRGB,
        rgbim=np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]),  # pydensecrf needs both
        compat=CRF_BILATERAL_COMPAT,
    )
    refined = np.empty(masks.shape, dtype=bool)
    for index, mask in enumerate(masks):
        unary = unary_from_labels(mask.astype(np.int32), 2, gt_prob=CRF_GT_PROB, zero_unsure=False)
        crf.setUnaryEnergy(np.ascontiguousarray(unary))  # replaces the previous mask's; the lattices stay
        q = np.asarray(crf.inference(CRF_ITERATIONS)).reshape(2, height, width)
        refined[index] = q[1] > q[0]
    return refined


class CrfProcessDied(RuntimeError):
    """A CRF child process exited (killed, out of memory) before answering."""


class CrfProcesses:
    """``count`` child processes, each driven by a thread of its own that waits on its pipe.

    A process is started on its thread's first request and replaced after it dies.
    """

    def __init__(self, count: int):
        self._count = count
        self._threads = ThreadPoolExecutor(count, thread_name_prefix="crf")
        self._local = threading.local()
        self._processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._in_flight = 0

    def submit(self, image: np.ndarray, masks: np.ndarray) -> Future[np.ndarray]:
        """The refined masks, computed in one of the processes."""
        with self._lock:
            self._in_flight += 1
        return self._threads.submit(self._refine, image, masks)

    def idle(self) -> int:
        """How many processes have no request running or waiting."""
        with self._lock:
            return max(self._count - self._in_flight, 0)

    def pids(self) -> list[int]:
        """The running processes' ids (for monitoring)."""
        with self._lock:
            return [process.pid for process in self._processes if process.poll() is None]

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            processes, self._processes = self._processes, []
        for process in processes:
            process.kill()
            process.wait()

    def _refine(self, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        try:
            return self._ask(self._process(), image, masks)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _ask(self, process: subprocess.Popen, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        count, height, width = masks.shape
        try:
            header = json.dumps({"height": height, "width": width, "masks": count}).encode() + b"\n"
            process.stdin.write(header + np.ascontiguousarray(image, np.uint8).tobytes() + masks.astype(np.uint8).tobytes())
            process.stdin.flush()
            answer = _read_exactly(process.stdout, count * height * width)
        except (OSError, EOFError) as error:
            self._forget(process)
            raise CrfProcessDied(f"CRF process {process.pid} died: {error}") from error
        return np.frombuffer(answer, np.uint8).reshape(count, height, width).astype(bool)

    def _process(self) -> subprocess.Popen:
        process = getattr(self._local, "process", None)
        if process is not None and process.poll() is not None:
            log.warning("CRF process %d died (exit code %d) while idle; starting another", process.pid,
                        process.returncode)
            self._forget(process)
            process = None
        if process is None:
            process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self._local.process = process
            with self._lock:
                self._processes.append(process)
        return process

    def _forget(self, process: subprocess.Popen) -> None:
        process.kill()
        process.wait()
        self._local.process = None
        with self._lock:
            self._processes = [p for p in self._processes if p is not process]


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError(f"expected {size} bytes, got {len(data or b'')}")
    return data


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """The child's loop: one answer per request, until the parent closes the pipe."""
    while header := requests.readline():
        shape = json.loads(header)
        count, height, width = int(shape["masks"]), int(shape["height"]), int(shape["width"])
        image = np.frombuffer(_read_exactly(requests, height * width * 3), np.uint8).reshape(height, width, 3)
        masks = np.frombuffer(_read_exactly(requests, count * height * width), np.uint8).reshape(count, height, width)
        answers.write(crf_refine(image, masks.astype(bool)).astype(np.uint8).tobytes())
        answers.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
