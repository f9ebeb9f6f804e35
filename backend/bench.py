"""``freesegdiff bench``: throughput, latency and re-prompt cost, against a naive baseline.

Everything is measured in one run on the same images and models, so ratios hold on a
noisy machine. The naive mode works like the authors' released code: one image at a
time, scikit-learn K-means, the CPU CRF for each cluster, CLIP called once per cluster.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from backend.cache import MemoryCache
from backend.images import read_image_file
from backend.labelstudio.results import brush_results
from backend.pipeline.clip_embeddings import TextImageEmbedder
from backend.pipeline.encoding import Encoding
from backend.pipeline.clustering import canonical_order
from backend.pipeline.labelling import cluster_masks
from backend.pipeline.refine import PendingMasks, Refiner, refine_masks
from backend.pipeline.segmenter import Segmenter, SegmentOptions, model_version
from backend.pipeline.vocabulary import labels_from_names
from backend.settings import RefineMethod, Settings

# Pascal VOC's 20 object classes: a realistic label set.
VOC_LABELS = ("aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,dining table,dog,horse,motorbike,person,"
              "potted plant,sheep,sofa,train,tv monitor").split(",")


@dataclass(frozen=True)
class BenchConfig:
    profile: str
    device: str
    images: int
    batch: int
    image_dir: Path | None = None
    json_path: Path | None = None


def synthetic_images(count: int, seed: int = 0, size: tuple[int, int] = (375, 500)) -> list[np.ndarray]:
    """Photo-like test images: a sky gradient, ground, a few solid shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    height, width = size
    rows, columns = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(count):
        horizon = int(height * rng.uniform(0.35, 0.65))
        image = np.zeros((height, width, 3), dtype=np.float32)
        image[:] = rng.uniform(60, 200, 3)
        image[:horizon] = np.linspace(rng.uniform(120, 255, 3), rng.uniform(60, 200, 3), horizon)[:, None, :]
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(20, height / 3), rng.uniform(20, width / 3)
            image[((rows - cy) / ry) ** 2 + ((columns - cx) / rx) ** 2 < 1] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 8, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


class PerClusterClip:
    """The released code's CLIP use: one call per masked image."""

    def __init__(self, clip: TextImageEmbedder):
        self.clip = clip

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.clip.embed_texts(texts)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([self.clip.embed_images([image]) for image in images])


class PerClusterRefiner(Refiner):
    """The released code's refinement: a new CRF for each cluster, one after another, on the inference thread."""

    def __init__(self) -> None:
        super().__init__("cpu", crf_processes=0)

    def start(self, image: np.ndarray, masks: np.ndarray, method: RefineMethod) -> PendingMasks:
        def one_cluster_at_a_time() -> np.ndarray:
            refined = [refine_masks(image, mask[None], method) for mask in masks]
            return refine_masks(image, np.concatenate(refined) if refined else masks, "none")  # the first mask wins

        return one_cluster_at_a_time


class NaiveSegmenter(Segmenter):
    """The baseline: scikit-learn K-means (10 inits, one after another), per-cluster CLIP, per-cluster CRFs in line."""

    def __init__(self, fast: Segmenter):
        super().__init__(fast.captioner, fast.features, PerClusterClip(fast.clip), fast.nlp, fast.fingerprint, "cpu",
                         refiner=PerClusterRefiner())

    def _clusters(self, encoding: Encoding, options: SegmentOptions) -> tuple[np.ndarray, np.ndarray]:
        with self._stage("clustering"):
            channels = encoding.features.shape[0]
            points = encoding.features.astype(np.float32).reshape(channels, -1).T
            assignment = KMeans(options.k, n_init=10, random_state=options.seed).fit_predict(points)
            grid = canonical_order(assignment).reshape(encoding.features.shape[1:])
            return grid, cluster_masks(grid, encoding.height, encoding.width)


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def _timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _cpu_seconds(segmenter: Segmenter) -> float:
    """CPU time used so far by this process (all threads) and by the segmenter's CRF processes.

    The processes' share is read from Linux's /proc; a process that is gone counts nothing.
    """
    processes = segmenter.refiner.processes
    total = time.process_time()
    for pid in processes.pids() if processes else []:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_bench(config: BenchConfig, settings: Settings) -> dict:
    """Measure, print a summary, and return the figures (also written to ``config.json_path``)."""
    settings = settings.model_copy(update={"models": config.profile, "device": config.device})
    load_start = time.perf_counter()
    fast = Segmenter.from_settings(settings)
    load_seconds = time.perf_counter() - load_start
    models_gpu_mb = torch.cuda.memory_allocated() / 2**20 if fast.device.type == "cuda" else None
    device = fast.device
    if config.image_dir:
        paths = sorted(p for p in config.image_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        images = [read_image_file(p) for p in paths[: config.images]]
    else:
        images = synthetic_images(config.images)
    labels = labels_from_names(VOC_LABELS)
    options = SegmentOptions.from_settings(settings)
    stages: dict[str, list[float]] = defaultdict(list)

    def predict(segmenter: Segmenter, batches: Sequence[Sequence[np.ndarray]]) -> None:
        """Predictions for every image, results included; batches overlap as ``segment_batches`` allows."""
        for _, segmentations in segmenter.segment_batches(enumerate(batches), labels, options):
            for segmentation in segmentations:
                start = time.perf_counter()
                brush_results(segmentation, "tag", "image")
                stages["results"].append(time.perf_counter() - start)
        _sync(device)

    predict(fast, [images[:1]])  # warm-up: first calls allocate, compile kernels, fill caches, start the CRF pool
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stages.clear()
    fast.observer = lambda stage, seconds: stages[stage].append(seconds)
    batches = [images[i : i + config.batch] for i in range(0, len(images), config.batch)]
    cpu_start = _cpu_seconds(fast)
    throughput_seconds = _timed(lambda: predict(fast, batches))
    cpu_seconds = _cpu_seconds(fast) - cpu_start
    fast.observer = None
    stage_medians = {stage: 1000 * statistics.median(values) for stage, values in sorted(stages.items())}
    latencies = [_timed(lambda image=image: predict(fast, [[image]])) for image in images]

    cache = MemoryCache(max_bytes=2**34)
    for index, image in enumerate(images):
        cache.put(str(index), fast.encode(image))
    reprompt_options = SegmentOptions(k=options.k + 1, refine=options.refine, seed=options.seed)
    reprompts = [
        _timed(lambda i=index, image=image: fast.segment(cache.get(str(i)), image, labels, reprompt_options))
        for index, image in enumerate(images)
    ]

    naive = NaiveSegmenter(fast)
    naive_cpu_start = _cpu_seconds(naive)
    naive_seconds = _timed(lambda: predict(naive, [[image] for image in images]))
    naive_cpu_seconds = _cpu_seconds(naive) - naive_cpu_start

    figures = {
        "profile": config.profile,
        "model_version": model_version(settings),
        "device": str(device),
        "images": len(images),
        "batch": config.batch,
        "k": options.k,
        "refine": options.refine,
        "crf_processes": fast.refiner.crf_processes,
        "images_per_s": len(images) / throughput_seconds,
        "baseline_images_per_s": len(images) / naive_seconds,
        "speedup": naive_seconds / throughput_seconds,
        "cpu_ms_per_image": 1000 * cpu_seconds / len(images),  # all threads and CRF processes
        "baseline_cpu_ms_per_image": 1000 * naive_cpu_seconds / len(images),
        "cpu_cores_busy": cpu_seconds / throughput_seconds,
        "baseline_cpu_cores_busy": naive_cpu_seconds / naive_seconds,
        "latency_p50_ms": 1000 * _percentile(latencies, 50),
        "latency_p95_ms": 1000 * _percentile(latencies, 95),
        "reprompt_p50_ms": 1000 * _percentile(reprompts, 50),
        "reprompt_to_cold_ratio": _percentile(reprompts, 50) / max(_percentile(latencies, 50), 1e-9),
        "stages_ms": stage_medians,  # per call: caption and features are called once per batch
        "model_load_s": load_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "models_gpu_mb": models_gpu_mb,  # all models loaded, before any image
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "hardware": _hardware(device),
        "date": time.strftime("%Y-%m-%d"),
    }
    _print(figures)
    if config.json_path:
        config.json_path.parent.mkdir(parents=True, exist_ok=True)
        config.json_path.write_text(json.dumps(figures, indent=2))
    return figures


def _hardware(device: torch.device) -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def _print(figures: dict) -> None:
    print(f"freesegdiff bench: {figures['profile']} on {figures['device']}, {figures['images']} images, "
          f"batch {figures['batch']}, K={figures['k']}, refine={figures['refine']} "
          f"({figures['crf_processes']} CRF processes)")
    print(f"  throughput      {figures['images_per_s']:8.2f} images/s   (naive {figures['baseline_images_per_s']:.2f}, "
          f"speedup x{figures['speedup']:.2f})")
    print(f"  CPU time        {figures['cpu_ms_per_image']:8.1f} ms/image ({figures['cpu_cores_busy']:.2f} cores busy; "
          f"naive {figures['baseline_cpu_ms_per_image']:.1f} ms/image, {figures['baseline_cpu_cores_busy']:.2f} cores busy)")
    print(f"  latency         p50 {figures['latency_p50_ms']:8.1f} ms   p95 {figures['latency_p95_ms']:.1f} ms")
    print(f"  re-prompt       p50 {figures['reprompt_p50_ms']:8.1f} ms   ({figures['reprompt_to_cold_ratio']:.2f} of a cold prediction)")
    print("  stages (median ms per call): " + ", ".join(f"{k} {v:.1f}" for k, v in figures["stages_ms"].items()))
    gpu = (f", GPU {figures['models_gpu_mb']:.0f} MB with the models loaded, peak {figures['peak_gpu_mb']:.0f} MB"
           if figures["peak_gpu_mb"] is not None else "")
    print(f"  memory          RSS peak {figures['peak_rss_mb']:.0f} MB{gpu}; models loaded in {figures['model_load_s']:.1f} s")
