"""Each stage's floor on this machine: its float32 operations over the measured float32 GEMM peak.

A stage's floor is the time it would take if every multiply-add it does ran at the speed of a large float32
matrix product with this process's threads: ``floor_s = gflop / peak_gflops``. A stage's measured time divided by
its floor says how far from the machine's limit it runs. The operations are counted by PyTorch's
``FlopCounterMode`` (matrix products, convolutions and attention: the work that dominates every stage) over one
prediction on torch eager: the features network on torch (not on an engine), the captioner loaded on torch eager
where its engine runs a converted copy. Counts are in the models' operations, whatever their dtype.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from backend.pipeline.features import FeatureExtractor
from backend.pipeline.parts import CaptionerParts
from backend.pipeline.segmenter import Segmenter
from backend.pipeline.vocabulary import Label
from backend.options import SegmentOptions

GEMM_SIZE = 2048  # large enough to run at the peak, small enough to take well under a second a product
GEMM_REPEATS = 5


def gemm_peak_gflops(device: torch.device = torch.device("cpu"), size: int = GEMM_SIZE,
                     repeats: int = GEMM_REPEATS) -> float:
    """The median speed, GFLOP/s, of ``torch.matmul`` on two float32 ``size`` x ``size`` matrices on ``device``
    (one product first as a warm-up), with this process's torch threads on a CPU."""
    first, second = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.matmul(first, second)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(first, second)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds) / 1e9


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a CUDA device's kernels run after the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_gflops(segmenter: Segmenter, eager_captioner: CaptionerParts | None, image: np.ndarray,
                 labels: Sequence[Label], options: SegmentOptions) -> dict[str, float]:
    """GFLOP per stage of one prediction of ``image`` on torch eager (``eager_captioner``: the captioner's torch
    model where the segmenter's runs on an engine; None where it runs on torch). Each stage is charged what was
    counted since the previous stage ended, as the segmenter reports its stages one after another."""
    counted = copy.copy(segmenter)
    counted.features = FeatureExtractor(segmenter.features.network)
    if eager_captioner is not None:
        counted.captioner = copy.copy(segmenter.captioner)
        counted.captioner.model = eager_captioner.model
    flops: dict[str, float] = {}
    with FlopCounterMode(display=False) as counter:
        seen = 0

        def charge(stage: str, _seconds: float) -> None:
            nonlocal seen
            total = counter.get_total_flops()
            flops[stage] = flops.get(stage, 0.0) + (total - seen) / 1e9
            seen = total

        counted.observed_by(charge).segment_image(image, labels, options)
    return flops


def stage_floors(gflops: dict[str, float], peak_gflops: float, measured_ms: dict[str, float]) -> dict[str, dict]:
    """Per stage with operations: its GFLOP, its floor in seconds and the measured time's multiple of it."""
    floors = {}
    for stage, count in sorted(gflops.items()):
        if count <= 0:
            continue
        floor_s = count / peak_gflops
        ms = measured_ms.get(stage)
        floors[stage] = {"gflop": count, "floor_s": floor_s,
                         "times_floor": None if ms is None else ms / 1000 / floor_s}
    return floors
